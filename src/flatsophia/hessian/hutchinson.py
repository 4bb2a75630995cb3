"""Hutchinson's estimator of the Hessian diagonal: ``d = v * (H v)`` with random probes ``v``.

Used by Sophia-H (Liu et al. 2023, arXiv:2305.14342) and FlatSophia. ``E[v * Hv] = diag(H)`` for
any probe with ``E[v v^T] = I`` (Gaussian or Rademacher).

Two ways to get ``H v`` (``hvp=``): ``"autograd"`` differentiates the gradient once more (a double
backward: exact, about 3.5-4.7x a forward+backward, needs the math attention kernel), and
``"finite_difference"`` takes it from two gradients, ``(grad L(theta + eps v) - grad L(theta)) / eps``
(one extra forward+backward when the training step's gradient is reused; any attention kernel).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import torch

from flatsophia.checks import check_int, check_positive
from flatsophia.sharding import any_dtensor, global_norm, local, local_shard, wrap_like

from .base import (
    HessianEstimator,
    capture_rng_state,
    cuda_devices,
    grads_set_aside,
    math_attention,
    preserved_buffers,
    replayed_rng,
)
from .precision import record_precision

DISTRIBUTIONS = ("gaussian", "rademacher")
HVP_MODES = ("autograd", "finite_difference")
_HALF = (torch.float16, torch.bfloat16)

#: Why ``hvp="autograd"`` is refused on parameters sharded by FSDP2, and what to use instead.
SHARDED_AUTOGRAD = (
    "Hutchinson with hvp='autograd' cannot run on parameters sharded by FSDP2: it differentiates "
    "with torch.autograd.grad, which cannot reach the sharded DTensor parameters (the forward uses "
    "FSDP's all-gathered copies), and a double backward through FSDP is not supported. Use "
    "hvp='finite_difference' (H v from two ordinary backward passes through FSDP's reduce-scatter; "
    "hvp='auto' picks it there), or SophiaG (Gauss-Newton-Bartlett)."
)


class Hutchinson(HessianEstimator):
    """Hutchinson diagonal-Hessian estimator.

    ``hvp="autograd"`` (reverse-over-reverse): one forward, one backward with ``create_graph=True``,
    then one more backward per probe (``torch.autograd.grad`` twice), so it works on an unwrapped
    module under DDP too (the caller averages the result across ranks).

    ``hvp="finite_difference"``: ``H v ~ (g(theta + eps v) - g(theta)) / eps`` with ``g`` the
    gradient, see :meth:`finite_difference` for the step ``eps``, the error bound and what the
    perturbed pass leaves untouched. Called as ``estimator(forward, loss_fn, params, module=net)``
    it takes both gradients itself (two extra passes); a training loop that already has the
    gradient at ``theta`` calls :meth:`finite_difference` (one extra pass).

    Args:
        distribution: ``"gaussian"`` (N(0, I), the reference's choice) or ``"rademacher"`` (+-1).
        n_probes: probes averaged per estimate (1 in the reference); more lowers the variance.
        seed: seed of the probe generator.
        math_sdpa: force the math kernel of scaled-dot-product attention during the estimate
            (flash / memory-efficient kernels have no double backward). Ignored (``False``) with
            ``hvp="finite_difference"``, which needs no double backward.
        hvp: ``"autograd"`` or ``"finite_difference"``.
        fd_scale: the relative step ``c`` of the finite difference (default ``sqrt(machine
            epsilon)`` of the parameters' dtype: 3.5e-4 in float32, 1.5e-8 in float64).

    **Sharded parameters** (FSDP2 DTensors): only ``hvp="finite_difference"`` runs (``"autograd"``
    raises ``ValueError``, see :data:`SHARDED_AUTOGRAD`). Both gradients come from ordinary
    ``backward()`` passes, which FSDP's reduce-scatter already averages across ranks (no further
    reduce), with the training gradient in ``.grad`` set aside and put back. Each probe is drawn at
    full size from the generator (seeded alike on every rank) and each rank keeps its shard, so a
    sharded run uses exactly the probes of one process: it costs one full-size draw of every
    parameter per probe on every rank (one parameter's full size in memory at a time). The norms
    in ``eps`` are all-reduced (one scalar all-reduce for the parameters, one per probe).
    """

    name = "hutchinson"

    def __init__(
        self,
        distribution: str = "gaussian",
        n_probes: int = 1,
        seed: int = 0,
        math_sdpa: bool = True,
        hvp: str = "autograd",
        fd_scale: float | None = None,
    ):
        super().__init__(seed)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Invalid distribution: {distribution!r} (expected one of {', '.join(DISTRIBUTIONS)})")
        check_int("n_probes", n_probes, 1)
        if hvp not in HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r} (expected one of {', '.join(HVP_MODES)})")
        if fd_scale is not None:
            check_positive("fd_scale", fd_scale)
        self.distribution = distribution
        self.n_probes = n_probes
        self.hvp = hvp
        self.fd_scale = fd_scale
        self.math_sdpa = math_sdpa and hvp == "autograd"

    def probe(self, like: torch.Tensor) -> torch.Tensor:
        """A random probe shaped like ``like`` drawn from this estimator's generator (for a DTensor:
        the full draw, of which this rank keeps its shard, laid out like ``like``)."""
        return wrap_like(self._probe_local(like), like)

    def _probe_local(self, like: torch.Tensor) -> torch.Tensor:
        device = local(like).device
        g = self.generator(device)
        if self.distribution == "gaussian":
            v = torch.randn(like.shape, generator=g, device=device, dtype=like.dtype)
        else:
            v = torch.randint(0, 2, like.shape, generator=g, device=device, dtype=torch.int8)
            v = v.to(like.dtype).mul_(2).sub_(1)
        return local_shard(v, like)

    def __call__(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
        *,
        module: torch.nn.Module | None = None,
        loss_scale: float = 1.0,
    ) -> list[torch.Tensor | None]:
        """``v * (H v)`` for ``loss_fn(forward())``, one entry per parameter.

        ``module``: the network whose buffers (BatchNorm statistics) the extra forward passes leave
        as they were. With finite differences the global RNG stream is left untouched too, and both
        passes see the same dropout masks. ``loss_scale``: see :meth:`from_loss` (the autograd
        form; the finite difference runs in 32-bit precision, where no loss scaling is needed).
        """
        params = list(params)
        if self.hvp == "finite_difference":
            state = capture_rng_state(cuda_devices(params))
            grads = self._gradient(forward, loss_fn, params, state, module)
            return self.finite_difference(grads, forward, loss_fn, params, rng_state=state, module=module)
        if any_dtensor(params):
            raise ValueError(SHARDED_AUTOGRAD)
        with preserved_buffers(module), torch.enable_grad(), math_attention(self.math_sdpa):
            loss = loss_fn(forward())
            return self.from_loss(loss, params, loss_scale=loss_scale)[1]

    def from_loss(
        self,
        loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        logits: torch.Tensor | None = None,
        *,
        loss_scale: float = 1.0,
    ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """Gradients and estimates from an already computed ``loss`` (one forward saved).

        The training loop uses this on a refresh step to take the training gradient and the
        Hessian-vector products from the same forward pass. The forward must have run with
        gradients enabled (and, for attention, under :func:`~flatsophia.hessian.base.math_attention`).
        ``logits`` is accepted (and unused) so that both estimators share one call signature.

        ``loss_scale``: differentiate ``loss * loss_scale`` (a ``torch.amp.GradScaler``'s scale,
        keeping float16 gradients from underflowing); the gradients come back scaled, as
        ``scaler.scale(loss).backward()`` leaves ``.grad``, and the estimates divided by it
        (exact for the scaler's powers of two; an overflow leaves them non-finite, which
        ``update_hessian`` skips).

        Returns:
            ``(grads, estimates)``: the detached gradient of ``loss * loss_scale`` and ``v * (H v)``
            per parameter (``None`` where the loss does not reach the parameter).
        """
        if self.hvp != "autograd":
            raise ValueError(
                "Hutchinson.from_loss differentiates the training gradient (hvp='autograd'); with "
                "hvp='finite_difference' call finite_difference() with the training gradient instead"
            )
        params = list(params)
        if any_dtensor(params):
            raise ValueError(SHARDED_AUTOGRAD)
        with torch.enable_grad():
            if loss_scale != 1:
                loss = loss * loss_scale
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
        if self.n_probes > 1 or loss_scale != 1:
            for i in live:
                out[i].div_(self.n_probes * loss_scale)
        # A parameter reached by the loss only linearly has a zero Hessian diagonal.
        for i, g in enumerate(grads):
            if g is not None and not g.requires_grad:
                out[i] = torch.zeros_like(params[i])
        return [None if g is None else g.detach() for g in grads], out

    def finite_difference(
        self,
        grads: Sequence[torch.Tensor | None],
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        params: Sequence[torch.Tensor],
        *,
        rng_state: dict | None = None,
        module: torch.nn.Module | None = None,
        loss_divisor: float = 1,
    ) -> list[torch.Tensor | None]:
        """``v * (H v)`` with ``H v ~ (g(theta + eps v) - g(theta)) / eps``, reusing ``g(theta)``.

        One forward + backward per probe at ``theta + eps v``, taken with ``torch.autograd.grad``
        (so under DDP it triggers no all-reduce and touches no ``.grad``); no double backward, so
        any attention kernel works.

        **Step.** ``eps = c (1 + ||theta||) / ||v||`` rounded to the nearest power of two
        (:func:`finite_difference_step`), so the perturbation ``eps v`` has length within a factor
        sqrt(2) of ``c (1 + ||theta||)``. The L2 norms run over all of ``params``, in float64,
        shard by shard when sharded; the rounding makes ``eps`` the same on one process and on any
        sharding (and on every rank), and exact in the parameters' dtype. ``c = fd_scale``, by
        default the square root of the parameters' machine epsilon (``torch.finfo(dtype).eps``:
        3.5e-4 in float32, 1.5e-8 in float64), which balances the two error terms below.

        **Error bound** (per coordinate, ``L`` three times differentiable along the segment):
        ``|Hv_fd_i - (Hv)_i| <= (eps / 2) max_t |D^3 L(theta + t v)[v, v]_i| + (2 delta_i + rho_i) / eps``
        where the first term is the truncation (Taylor remainder, ``t`` in ``[0, eps]``),
        ``delta_i`` the rounding error of each computed gradient coordinate, and ``rho_i =
        |(H r)_i|`` the effect of rounding ``theta + eps v`` to the parameter dtype (``|r_j| <= u
        |theta_j + eps v_j|``, ``u`` = half the machine epsilon). The diagonal estimate
        ``v_i Hv_fd_i`` carries ``|v_i|`` times that.
        Measured relative L2 error of ``v * Hv`` against the exact product (same probe, same
        dropout masks; float32, default ``c``; median over 5 probes): 0.045% on a small MLP,
        0.3-0.4% (at most 0.43%) on a timm ViT with dropout and stochastic depth and on the
        project's GPT with dropout; 2e-8 (MLP) to 3e-7 in float64 (the models and the exact product
        of ``tests/hessian/test_finite_difference.py``). That is far below the estimator's own
        noise: with one Gaussian probe each coordinate's relative standard deviation is at least
        ``sqrt(2)``.

        **Precision.** Half-precision parameters, autocast, and TF32 matmuls on CUDA are refused
        when this runs: a perturbation of relative size 3.5e-4 is below bf16's resolution (3.9e-3)
        and at fp16's and TF32's (9.8e-4), so the difference of the gradients would be rounding
        noise. ``grads`` must come from a pass in full precision too, which this cannot see: reusing
        a gradient made under bf16 autocast gives a relative error of 1.2-6.9 in ``v * Hv``, under
        fp16 autocast or TF32 0.15-0.76 (docs/results/hvp_precision).
        :class:`~flatsophia.hessian.refresh.HessianRefresher` records the training pass's precision
        and then takes both gradients itself in float32 (:func:`~flatsophia.hessian.precision.full_precision`).

        **No side effects.** The perturbed pass replays ``rng_state`` (the global RNG state, CPU and
        CUDA, captured just before the pass that produced ``grads``: the same dropout and
        stochastic-depth masks) and then puts the RNG stream back where it was; the buffers of
        ``module`` (BatchNorm running statistics) are restored in place; the parameters are
        restored from a saved copy (bit for bit, not by subtracting ``eps v``).

        Args:
            grads: the gradient of ``loss_fn(forward()) / loss_divisor`` at the current
                parameters, one per ``params`` entry (``None`` where the loss does not reach the
                parameter), from a pass over the same data as ``forward``.
            forward, loss_fn: as for :meth:`__call__`; run once per probe at ``theta + eps v``.
            params: the parameters ``grads`` belongs to.
            rng_state: :func:`~flatsophia.hessian.base.capture_rng_state` taken just before the
                pass that produced ``grads`` (``None``: the current state).
            module: the network whose buffers the perturbed pass must not change.
            loss_divisor: the divisor of the loss ``grads`` belongs to (micro-batches accumulated).

        Returns:
            ``v * (H v)`` per parameter (``None`` where ``grads`` is ``None``).
        """
        params = list(params)
        if len(grads) != len(params):
            raise ValueError(f"finite_difference: {len(grads)} gradients for {len(params)} parameters")
        out: list[torch.Tensor | None] = [None] * len(params)
        live = [i for i, g in enumerate(grads) if g is not None]
        if not live:
            return out
        lp, g0 = [params[i] for i in live], [local(grads[i]).detach() for i in live]
        _check_precision(lp)
        c = self.fd_scale or math.sqrt(max(torch.finfo(p.dtype).eps for p in lp))
        xs = [local(p) for p in lp]  # sharded: this rank's shards, which FSDP all-gathers in the forward
        theta_norm = global_norm(lp, torch.float64).item()
        if rng_state is None:
            rng_state = capture_rng_state(cuda_devices(lp))
        saved = [x.detach().clone() for x in xs]
        for _ in range(self.n_probes):
            vs = [self._probe_local(p) for p in lp]
            probe_norm = global_norm([wrap_like(v, p) for v, p in zip(vs, lp)], torch.float64).item()
            eps = finite_difference_step(c, theta_norm, probe_norm)
            try:
                with torch.no_grad():
                    torch._foreach_add_(xs, vs, alpha=eps)
                g1 = self._gradient(forward, loss_fn, lp, rng_state, module, loss_divisor)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(xs, saved)
            hv = torch._foreach_sub([torch.zeros_like(b) if a is None else a for a, b in zip(g1, g0)], g0)
            torch._foreach_mul_(hv, loss_divisor / eps)
            torch._foreach_mul_(vs, hv)  # v * Hv
            for i, d in zip(live, vs):
                out[i] = d if out[i] is None else out[i].add_(d)
        if self.n_probes > 1:
            for i in live:
                out[i].div_(self.n_probes)
        return [None if d is None else wrap_like(d, p) for d, p in zip(out, params)]

    @staticmethod
    def _gradient(forward, loss_fn, params, rng_state, module, loss_divisor: float = 1) -> list:
        """The gradient of ``loss_fn(forward()) / loss_divisor`` at the current parameters, the pass
        replaying ``rng_state`` and leaving ``module``'s buffers and the RNG stream as they were.

        Plain parameters: ``torch.autograd.grad`` (no DDP all-reduce, ``.grad`` untouched). Sharded
        (FSDP2): ``backward()``, averaged across ranks by FSDP's reduce-scatter, taken out of
        ``.grad`` with the gradient already there put back; returned as this rank's shards.
        """
        sharded = any_dtensor(params)
        aside = grads_set_aside(params, module) if sharded else contextlib.nullcontext()
        with replayed_rng(rng_state), preserved_buffers(module), aside as taken, torch.enable_grad():
            loss = loss_fn(forward())
            if loss_divisor != 1:
                loss = loss / loss_divisor
            if not sharded:
                return list(torch.autograd.grad(loss, params, allow_unused=True))
            loss.backward()
        return [None if g is None else local(g) for g in taken]


def finite_difference_step(c: float, theta_norm: float, probe_norm: float) -> float:
    """The step ``eps`` of :meth:`Hutchinson.finite_difference`: ``c (1 + theta_norm) / probe_norm``
    rounded to the nearest power of two (nearest on a log scale, so within a factor sqrt(2)).

    The rounding makes ``eps`` exact in any float dtype (``theta + eps v`` then rounds only once,
    and dividing by ``eps`` is exact) and blind to the last bits of the norms: a sharded run, whose
    norms are summed shard by shard, gets the very ``eps`` of one process, unless the unrounded
    value lies within their rounding difference (about 1e-16 relative in float64) of a midpoint
    ``2**(k + 1/2)``, which is negligibly unlikely.
    """
    raw = c * (1.0 + theta_norm) / max(probe_norm, 1e-30)
    mantissa, exponent = math.frexp(raw)  # raw = mantissa * 2**exponent, mantissa in [0.5, 1)
    return math.ldexp(1.0, exponent if mantissa >= math.sqrt(0.5) else exponent - 1)


def _check_precision(params: Sequence[torch.Tensor]) -> None:
    """Refuse to perturb the weights where the perturbed pass would not run in full precision."""
    reason = (
        "it perturbs the weights by a relative ~3.5e-4, below bf16/fp16/TF32 resolution, so the difference of "
        "the two gradients would be rounding noise; use hvp=autograd, or 32-bit precision"
    )
    half = sorted({str(p.dtype).removeprefix("torch.") for p in params if p.dtype in _HALF})
    if half:
        raise ValueError(f"hvp=finite_difference needs float32 or float64 parameters, got {', '.join(half)}: {reason}")
    precision = record_precision(params)
    if precision.autocast is not None:
        devices = ", ".join(sorted(d for d in {p.device.type for p in params} if torch.is_autocast_enabled(d)))
        raise RuntimeError(f"hvp=finite_difference cannot run under autocast ({devices}): {reason}")
    if not precision.full:
        raise RuntimeError(
            f"hvp=finite_difference cannot run with {precision.describe()}: {reason} "
            "(or run it inside flatsophia.hessian.precision.full_precision())"
        )
