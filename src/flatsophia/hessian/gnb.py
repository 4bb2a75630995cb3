"""Gauss-Newton-Bartlett estimator (Sophia-G): gradient of the loss on labels sampled from the model.

Liu et al. 2023 (arXiv:2305.14342), Algorithm 2: sample ``yhat ~ softmax(logits)``, take the gradient
``ghat`` of the mean cross-entropy on those labels; ``B * ghat * ghat`` estimates the Gauss-Newton
diagonal. As in the authors' code the optimizer squares ``ghat`` itself and applies ``B`` through its
``bs`` argument, so this estimator returns ``ghat``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from flatsophia.sharding import any_dtensor

from .base import HessianEstimator, grads_set_aside, preserved_buffers


class GaussNewtonBartlett(HessianEstimator):
    """Sampled-label gradient for categorical outputs (classification and language modelling).

    The ``forward`` closure must return logits shaped ``(..., num_classes)``; the training loss
    is not used (it only has to be a cross-entropy over the same logits, which the caller checks).
    Positions whose training label is ``ignore_index`` can be excluded by passing ``valid_mask``
    (shaped like ``logits.shape[:-1]``, nonzero = keep); the sampled-label loss is then the mean
    over the kept positions (zero gradients if there are none).

    On parameters sharded by FSDP2 (DTensors) the sampled-label gradient is taken with an ordinary
    ``backward()`` instead of ``torch.autograd.grad`` (which cannot reach sharded parameters): FSDP's
    reduce-scatter averages it across ranks, as for the training gradient, and the training
    gradient in ``.grad`` is set aside and put back (:func:`~flatsophia.hessian.base.grads_set_aside`).
    """

    name = "gnb"

    def __call__(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor] | None,
        params: Sequence[torch.Tensor],
        valid_mask: torch.Tensor | None = None,
        *,
        module: torch.nn.Module | None = None,
        loss_scale: float = 1.0,
    ) -> list[torch.Tensor | None]:
        """``ghat`` per parameter. ``module``: the network, whose buffers (BatchNorm statistics)
        the extra forward leaves as they were, and, with sharded parameters, whose other
        parameters' ``.grad`` the backward must not change either. ``loss_scale``: see
        :meth:`from_loss`."""
        params = list(params)
        with preserved_buffers(module):
            if any_dtensor(params):
                with grads_set_aside(params, module) as taken, torch.enable_grad():
                    (self.sampled_loss(forward(), valid_mask) * loss_scale).backward()
                return _unscaled(taken, loss_scale)
            with torch.enable_grad():
                loss = self.sampled_loss(forward(), valid_mask) * loss_scale
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        return _unscaled(list(grads), loss_scale)

    def from_loss(
        self,
        loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        logits: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
        *,
        loss_scale: float = 1.0,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Training gradients and the sampled-label gradients from ONE forward pass.

        ``logits`` is the output of the forward that produced the training ``loss`` (run with
        gradients enabled). Labels are sampled from its detached softmax, exactly as
        :meth:`__call__` does on a fresh forward, and both losses are differentiated through the
        same graph (the first backward keeps it with ``retain_graph=True``), so the refresh costs
        one extra backward instead of a forward and a backward. With the same generator state
        and a deterministic forward, the estimates equal those of :meth:`__call__`.

        ``loss_scale``: differentiate both losses times ``loss_scale`` (a ``torch.amp.GradScaler``'s
        scale, keeping float16 gradients from underflowing); the training gradients come back
        scaled, as ``scaler.scale(loss).backward()`` leaves ``.grad``, and ``ghat`` divided by it
        (exact for the scaler's powers of two; an overflow leaves it non-finite, which
        ``update_hessian`` skips).

        Returns:
            ``(grads, estimates)``: the detached gradient of ``loss * loss_scale`` and the
            sampled-label gradient ``ghat`` per parameter (``None`` where the respective loss does
            not reach it).
        """
        if logits is None:
            raise ValueError(
                "GaussNewtonBartlett.from_loss needs the logits of the forward that produced the loss "
                "(logits=...) to sample labels from"
            )
        params = list(params)
        if any_dtensor(params):
            raise ValueError(
                "GaussNewtonBartlett.from_loss differentiates with torch.autograd.grad, which cannot reach "
                "parameters sharded by FSDP2; call the estimator itself (a separate backward) instead"
            )
        with torch.enable_grad():
            sampled = self.sampled_loss(logits, valid_mask) * loss_scale
            grads = torch.autograd.grad(loss * loss_scale, params, retain_graph=True, allow_unused=True)
            ghat = torch.autograd.grad(sampled, params, allow_unused=True)
        return [None if g is None else g.detach() for g in grads], _unscaled(list(ghat), loss_scale)

    def sampled_loss(self, logits: torch.Tensor, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` on labels drawn from their own (detached) softmax."""
        if not isinstance(logits, torch.Tensor) or logits.ndim < 2 or not logits.is_floating_point():
            raise ValueError(
                "Gauss-Newton-Bartlett needs categorical logits shaped (..., num_classes) to sample "
                f"labels from; got {getattr(logits, 'shape', type(logits).__name__)}. For other losses "
                "use the Hutchinson estimator (hessian=hutchinson, e.g. optimizer=sophia_h)."
            )
        flat = logits.reshape(-1, logits.shape[-1])
        valid = None
        if valid_mask is not None:
            valid = torch.as_tensor(valid_mask, device=flat.device).reshape(-1).bool()
            if valid.numel() != flat.shape[0]:
                raise ValueError(
                    f"valid_mask has {valid.numel()} entries for {flat.shape[0]} predictions "
                    f"(logits shaped {tuple(logits.shape)}); it must match logits.shape[:-1]"
                )
        with torch.no_grad():
            probs = torch.softmax(flat.detach().float(), dim=-1)
            yhat = self.sample_labels(probs)
            if valid is not None:
                yhat = torch.where(valid, yhat, torch.full_like(yhat, -100))
        if valid is None:
            return F.cross_entropy(flat, yhat)
        # Mean over the valid positions; with none, zero gradients (the "mean" reduction
        # would divide by zero and return NaN).
        total = F.cross_entropy(flat, yhat, ignore_index=-100, reduction="sum")
        return total / valid.sum().clamp(min=1)

    def sample_labels(self, probs: torch.Tensor) -> torch.Tensor:
        """One label per row of ``probs`` (N, C), drawn from this estimator's generator."""
        return torch.multinomial(probs, 1, generator=self.generator(probs.device)).squeeze(-1)


def _unscaled(grads: list[torch.Tensor | None], loss_scale: float) -> list[torch.Tensor | None]:
    """``grads`` divided by ``loss_scale`` in place (``None`` entries kept)."""
    if loss_scale != 1:
        for g in grads:
            if g is not None:
                g.div_(loss_scale)
    return grads
