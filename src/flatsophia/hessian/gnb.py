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

    Data-parallel ranks: labels are sampled for the global batch, the ranks' rows (positions of
    ``logits.shape[:-1]``, flattened) concatenated in rank order. Every rank draws one uniform per
    global row from the shared stream (the same seed and state on every rank) and keeps its own
    slice, so labels are independent across rows and ranks, the generators stay identical on every
    rank (one rank's checkpoint resumes all), and N ranks averaging their estimates (DDP's
    ``reduce``, FSDP's reduce-scatter) get the labels, hence the estimate, of one process over the
    concatenated batch (equal row counts; with unequal counts each rank's mean is weighted alike,
    as DDP weights the training loss). The ranks learn their row offsets with one all-gather of row
    counts per call, so every rank of the group must call the estimator together.

    Args:
        seed: seed of the generator (one per device type, saved in :meth:`state_dict`).
        process_group: the data-parallel ranks that share one global batch: ``None`` for the default
            ``torch.distributed`` group when it is initialized (a single process otherwise).
    """

    name = "gnb"

    def __init__(self, seed: int = 0, *, process_group=None):
        super().__init__(seed)
        self.process_group = process_group

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
                "use the Hutchinson estimator (estimator='hutchinson', with SophiaH or FlatSophia)."
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
        """One label per row of ``probs`` (N, C), by inverse CDF of one uniform per row.

        The uniforms are this process's slice of those of the global batch (see the class
        docstring), drawn from this estimator's generator in float64.
        """
        offset, total = global_rows(probs.shape[0], probs.device, self.process_group)
        g = self.generator(probs.device)
        u = torch.rand(total, generator=g, device=g.device, dtype=torch.float64)
        return inverse_cdf(probs, u[offset : offset + probs.shape[0]].to(probs.device))


#: elements of ``probs`` handled at once by :func:`inverse_cdf` (its float64 temporaries: ~5x 8 bytes each)
_CHUNK = 1 << 22


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row ``i``'s label: the class ``k`` with ``cdf[k-1] <= u[i] * cdf[C-1] < cdf[k]``.

    ``probs`` (N, C): non-negative weights per row (not necessarily summing to one); ``u`` (N,):
    uniforms in ``[0, 1)``. The cumulative sums are taken in float64 and scaled by their total, so
    the rounding of ``probs`` does not bias the draw, and ``u[i] * total < total``: a ``u`` close to
    1 draws the last class of positive weight. A class of weight zero is never drawn, however the
    sum was rounded (a parallel scan, on a GPU, may round ``cdf[k]`` above ``cdf[k-1]`` although
    ``probs[k] == 0``, or below it): its cumulative value is set to the largest before it, which
    also makes the sums non-decreasing. Rows with NaN get some class in ``[0, C)`` (their loss is
    NaN anyway). Processed in chunks of rows, to bound the float64 temporaries.
    """
    n, c = probs.shape
    out = torch.empty(n, dtype=torch.long, device=probs.device)
    rows = max(1, _CHUNK // max(c, 1))
    for start in range(0, n, rows):
        p = probs[start : start + rows].double()
        cdf = torch.where(p > 0, torch.cumsum(p, dim=-1), float("-inf")).cummax(dim=-1).values
        target = u[start : start + rows, None].double() * cdf[:, -1:]
        out[start : start + rows] = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=c - 1)
    return out


def global_rows(n: int, device: torch.device, group=None) -> tuple[int, int]:
    """``(offset, total)``: where this process's ``n`` rows start in the global batch (the rows of
    the ranks of ``group``, default: the default process group, concatenated in rank order), and
    how many rows it has. ``(0, n)`` without an initialized ``torch.distributed``; otherwise one
    all-gather of the row counts (on the CPU with gloo, else on ``device``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return 0, n
    if "gloo" in str(dist.get_backend(group)):
        device = torch.device("cpu")
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    counts = [int(c) for c in counts]
    return sum(counts[: dist.get_rank(group)]), sum(counts)


def _unscaled(grads: list[torch.Tensor | None], loss_scale: float) -> list[torch.Tensor | None]:
    """``grads`` divided by ``loss_scale`` in place (``None`` entries kept)."""
    if loss_scale != 1:
        for g in grads:
            if g is not None:
                g.div_(loss_scale)
    return grads
