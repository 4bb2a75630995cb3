"""Hutchinson's estimator of the Hessian diagonal: ``d = v * (H v)`` with random probes ``v``.

Used by Sophia-H (Liu et al. 2023, arXiv:2305.14342) and FlatSophia. ``E[v * Hv] = diag(H)`` for
any probe with ``E[v v^T] = I`` (Gaussian or Rademacher).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import HessianEstimator, math_attention

DISTRIBUTIONS = ("gaussian", "rademacher")


class Hutchinson(HessianEstimator):
    """Hutchinson diagonal-Hessian estimator by reverse-over-reverse differentiation.

    One forward, one backward with ``create_graph=True``, then one more backward per probe
    (``torch.autograd.grad`` twice), so it works on an unwrapped module under DDP too (the caller
    averages the result across ranks).

    Args:
        distribution: ``"gaussian"`` (N(0, I), the reference's choice) or ``"rademacher"`` (+-1).
        n_probes: probes averaged per estimate (1 in the reference); more lowers the variance.
        seed: seed of the probe generator.
        math_sdpa: force the math kernel of scaled-dot-product attention during the estimate
            (flash / memory-efficient kernels have no double backward).
    """

    name = "hutchinson"

    def __init__(self, distribution: str = "gaussian", n_probes: int = 1, seed: int = 0, math_sdpa: bool = True):
        super().__init__(seed)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (expected one of {', '.join(DISTRIBUTIONS)})")
        if not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1:
            raise ValueError(f"Invalid n_probes: {n_probes!r} (expected an integer >= 1)")
        self.distribution = distribution
        self.n_probes = n_probes
        self.math_sdpa = math_sdpa

    def probe(self, like: torch.Tensor) -> torch.Tensor:
        """A random probe shaped like ``like`` drawn from this estimator's generator."""
        g = self.generator(like.device)
        if self.distribution == "gaussian":
            return torch.randn(like.shape, generator=g, device=like.device, dtype=like.dtype)
        v = torch.randint(0, 2, like.shape, generator=g, device=like.device, dtype=torch.int8)
        return v.to(like.dtype).mul_(2).sub_(1)

    def __call__(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        params = list(params)
        with torch.enable_grad(), math_attention(self.math_sdpa):
            loss = loss_fn(forward())
            return self.from_loss(loss, params)[1]

    def from_loss(
        self, loss: torch.Tensor, params: Sequence[torch.Tensor], logits: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Gradients and estimates from an already computed ``loss`` (one forward saved).

        The training loop uses this on a refresh step to take the training gradient and the
        Hessian-vector products from the same forward pass. The forward must have run with
        gradients enabled (and, for attention, under :func:`~flatsophia.hessian.base.math_attention`).
        ``logits`` is accepted (and unused) so that both estimators share one call signature.

        Returns:
            ``(grads, estimates)``: the detached gradient of ``loss`` and ``v * (H v)`` per parameter
            (``None`` where the loss does not reach the parameter).
        """
        params = list(params)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out: list[torch.Tensor | None] = [None] * len(params)
        # With no live parameter (every parameter reached only linearly, or not at all) there is
        # nothing to differentiate: autograd.grad would raise on the empty input list.
        for k in range(self.n_probes if live else 0):
            vs = [self.probe(params[i]) for i in live]
            hvs = torch.autograd.grad(
                [grads[i] for i in live],
                [params[i] for i in live],
                grad_outputs=vs,
                retain_graph=k < self.n_probes - 1,
                allow_unused=True,
            )
            for i, v, hv in zip(live, vs, hvs):
                d = torch.zeros_like(v) if hv is None else v.mul_(hv)
                out[i] = d if out[i] is None else out[i].add_(d)
        if self.n_probes > 1:
            for i in live:
                out[i].div_(self.n_probes)
        # A parameter reached by the loss only linearly has a zero Hessian diagonal.
        for i, g in enumerate(grads):
            if g is not None and not g.requires_grad:
                out[i] = torch.zeros_like(params[i])
        return [None if g is None else g.detach() for g in grads], out
