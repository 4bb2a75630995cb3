"""Sophia-H: Sophia with the Hutchinson diagonal Hessian estimator.

Paper: Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342 (2023).
Update rule as in the FlatSophia reference (github.com/evanatyourservice/flat-sophia,
``flat_sophia.py``, ``scale_by_sophia_h`` with ``project_to_flat=False``; JAX/optax, MIT), of which
this is an independent PyTorch implementation. :class:`~flatsophia.optim.FlatSophia` adds the
sharpness mask on top of this class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from ._common import (
    all_finite,
    check_betas,
    check_bool,
    check_estimates,
    check_nonneg,
    check_positive,
    gather,
    hessian_ema_stats,
    hessian_params,
    params_with_grad,
)
from ._fused import FusedStep
from ._kernels import (
    SOPHIA_H_COMPILED,
    Scratch,
    by_device_and_dtype,
    check_compile,
    check_foreach,
    foreach_split,
    hyper_tensor,
    increment_steps,
    one_scalar_dtype,
    sophia_h_eager,
    sophia_h_foreach,
    step_counter_on,
)

__all__ = ["SophiaH"]


class SophiaH(Optimizer):
    r"""Sophia-H, as in the flat-sophia reference's ``scale_by_sophia_h``.

    With :math:`d = v \odot Hv` a Hutchinson estimate of the Hessian diagonal (given to
    :meth:`update_hessian` every ``k`` steps) and :math:`t` the step count:

    .. math::
        \begin{aligned}
        &\nu \leftarrow \beta_2 \nu + (1-\beta_2)\, d
            \quad\text{(refresh steps only; no bias correction; } \nu \text{ may be negative)}\\
        &\mu \leftarrow \beta_1 \mu + (1-\beta_1) g, \qquad \hat\mu = \mu / (1-\beta_1^t)\\
        &u = \mathrm{clip}\big(\hat\mu / \max(\gamma \nu, \epsilon),\, -c,\, c\big)\\
        &\theta \leftarrow \theta - \eta\,(u + \lambda \theta)
        \end{aligned}

    Where :math:`\nu \le 0` the denominator is :math:`\epsilon`, so :math:`|u|` hits the clip
    threshold and the step is bounded by :math:`\eta c` per coordinate.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (default 3e-3, the reference experiment's peak).
        betas: :math:`(\beta_1, \beta_2)` (default (0.965, 0.99)).
        gamma: Hessian scale :math:`\gamma` (default 0.01).
        eps: floor of the denominator :math:`\epsilon` (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda`, applied as ``lr * wd * p``
            (default 1e-4, the reference's ``sophia_h`` default).
        clip_threshold: :math:`c` (default 1.0); ``None`` disables clipping.
        mu_dtype: dtype of the momentum buffer (default: the parameter's); ``torch.bfloat16``
            halves its memory as in the reference experiment.
        compile: ``True`` runs the step as one ``torch.compile``d call for all groups (fused
            kernels; the first step compiles; steps with ``collect_stats=True`` and a ``mu_dtype``
            other than the parameter's run eagerly); ``"reduce-overhead"`` also replays it as a
            CUDA graph on GPU (the fastest GPU step; one extra gradient-sized buffer; same as
            ``True`` on CPU). Falls back to the eager step, logging why, where compilation fails.
            The compiled arithmetic may differ from the eager one in the last bits.
        fused: ``True`` runs the step on CPU as one call of a C++ kernel over all groups (one pass
            over memory, one parallel region; the extension is compiled on first use, ~25 s, and
            cached). Takes precedence over ``compile`` where it applies: CPU float32/float64
            parameters whose gradient and state share their dtype and layout, steps without
            ``collect_stats``; elsewhere (CUDA, ``mu_dtype``, no C++ compiler) the ``compile`` or
            eager step runs, logging why once. Same arithmetic as ``compile=True``.
        foreach: ``True``: eager step with multi-tensor ops (one kernel launch per operation for
            all tensors of a device and dtype); ``False``: a loop over tensors. ``None`` (default):
            multi-tensor when all parameters are on CUDA, as in ``torch.optim``; on CPU,
            multi-tensor for tensors under 65,536 elements (dispatch-bound) and the loop for larger
            ones. Same arithmetic either way (bit-identical on CPU). Steps with
            ``collect_stats=True``, and groups whose ``mu_dtype`` differs from the parameters', use
            the loop.

    A call sequence ``update_hessian(d); step()`` is one reference update with
    ``update_preconditioner=True``; ``step()`` alone is one with ``False``.
    Non-finite estimates are skipped with a ``RuntimeWarning`` (state untouched) and
    :meth:`update_hessian` returns ``False``.
    """

    is_second_order = True
    hessian_estimator = "hutchinson"

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        clip_threshold: float | None = 1.0,
        *,
        mu_dtype: torch.dtype | str | None = None,
        compile: bool | str = False,
        fused: bool = False,
        foreach: bool | None = None,
        **extra_defaults,
    ):
        check_nonneg("learning rate", lr)
        check_foreach(foreach)
        check_betas(betas)
        check_nonneg("gamma", gamma)
        check_positive("eps", eps)
        check_nonneg("weight_decay", weight_decay)
        if clip_threshold is not None:
            check_positive("clip_threshold", clip_threshold)
        if isinstance(mu_dtype, str):
            mu_dtype = _parse_dtype(mu_dtype)
        if mu_dtype is not None and not (isinstance(mu_dtype, torch.dtype) and mu_dtype.is_floating_point):
            raise ValueError(f"Invalid mu_dtype: {mu_dtype!r} (expected None or a floating torch.dtype)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            mu_dtype=mu_dtype,
            **extra_defaults,
        )
        super().__init__(params, defaults)
        # Mutated in place only (never rebound): Lightning's optimizer wrapper copies __dict__.
        self._last_step_stats: dict[str, torch.Tensor] = {}
        self._scratch = Scratch()
        self._hp_cache: dict = {}
        self.compile = check_compile(compile)
        check_bool("fused", fused)
        self.fused = fused
        self._fused = FusedStep()
        self.foreach = foreach

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_last_step_stats", {})
        self.__dict__.setdefault("_scratch", Scratch())
        self.__dict__.setdefault("_hp_cache", {})
        self.__dict__.setdefault("compile", False)
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("_fused", FusedStep())
        self.__dict__.setdefault("foreach", None)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict`` that keeps the state's own dtypes.

        The base class casts every state tensor but ``step`` to the parameter's dtype, which would
        turn a ``mu_dtype`` momentum (e.g. bfloat16) and FlatSophia's int8 mask into full-precision
        buffers after a resume (more memory, and a different trajectory than the uninterrupted
        run). Both are cast back here; the round trip is exact (bf16 -> fp32 -> bf16, and small
        integers).
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            mu_dtype = group.get("mu_dtype")
            if isinstance(mu_dtype, str):
                mu_dtype = _parse_dtype(mu_dtype)
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                if mu_dtype is not None and "exp_avg" in state and state["exp_avg"].dtype != mu_dtype:
                    state["exp_avg"] = state["exp_avg"].to(mu_dtype)
                if "mask" in state and state["mask"].dtype != torch.int8:
                    state["mask"] = state["mask"].to(torch.int8)

    # ------------------------------------------------------------------ state
    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, device=p.device if self.compile else None)
            mu_dtype = group["mu_dtype"] or p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=mu_dtype, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def hessian_params(self) -> list[torch.Tensor]:
        """Parameters :meth:`update_hessian` expects estimates for (``requires_grad``, group order)."""
        return hessian_params(self.param_groups)

    # ---------------------------------------------------------------- hessian
    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None]) -> bool:
        """Fold one Hutchinson estimate ``d = v * (H v)`` per parameter into the Hessian EMA.

        Args:
            estimates: one tensor per entry of :meth:`hessian_params` (``None`` for a parameter the
                loss does not depend on), e.g. from :class:`flatsophia.hessian.Hutchinson`.

        Returns:
            ``True`` if the state was updated; ``False`` if the estimate held NaN/inf and was skipped.
        """
        params = self.hessian_params()
        check_estimates(params, estimates)
        if not all_finite(estimates):
            warnings.warn(
                f"{type(self).__name__}.update_hessian: the Hessian estimate holds NaN/inf; skipped (state unchanged).",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        pairs = [(p, e) for p, e in zip(params, estimates) if e is not None]
        by_beta: dict[float, tuple[list, list]] = {}
        for p, e in pairs:
            group = groups[id(p)]
            b2 = group["betas"][1]
            h = self._init_state(p, group)["hessian"]
            if e.dtype != h.dtype or e.device != h.device:
                h.mul_(b2).add_(e, alpha=1 - b2)
                continue
            hs, es = by_beta.setdefault(b2, ([], []))
            hs.append(h)
            es.append(e)
        for b2, (hs, es) in by_beta.items():  # h = b2 * h + (1 - b2) * e, one dispatch per group
            torch._foreach_mul_(hs, b2)
            torch._foreach_add_(hs, es, alpha=1 - b2)
        self._after_hessian_update(pairs, groups)
        return True

    def _after_hessian_update(self, pairs, groups) -> None:
        """Hook for subclasses (FlatSophia refreshes its sharpness mask here)."""

    def _direction_divisor(self, state: dict) -> torch.Tensor | None:
        """Per-coordinate divisor of the clipped direction (FlatSophia's mask); ``None`` for none."""
        return None

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None, collect_stats: bool = False):
        """One update with the current Hessian EMA (and mask).

        Args:
            closure: optional closure re-evaluating the loss.
            collect_stats: record the win rate (fraction of coordinates with ``|u| < clip``) and
                the RMS of the final direction ``u`` (before ``lr``) as 0-d tensors for
                :meth:`stats`; no host sync.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fused and not collect_stats and self._fused_step():
            return loss
        if self.compile and not collect_stats and self._compiled_step():
            return loss
        n_kept = sq_sum = None
        n_total = 0
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, wd, gamma, eps = group["lr"], group["weight_decay"], group["gamma"], group["eps"]
            clip = group["clip_threshold"]
            params = [p for p, _ in params_with_grad(group, type(self).__name__)]
            if not params:
                continue
            multi = [False] * len(params) if collect_stats else foreach_split(self.foreach, params)
            if any(multi) and self._foreach_group(group, [p for p, m in zip(params, multi) if m]):
                params = [p for p, m in zip(params, multi) if not m]
            for p in params:
                self._init_state(p, group)["step"] += 1
            for p in params:
                state = self.state[p]
                # As in the reference, the new momentum is formed in the wider of the parameter's
                # and ``mu_dtype``'s precisions and only stored in ``mu_dtype``; the update uses the
                # unrounded one (a float32 ``mu_dtype`` under bf16 parameters keeps float32 momentum).
                # Each tensor is bias corrected with its own count (one that joined late has a smaller one).
                stats = [] if collect_stats else None
                sophia_h_eager(
                    p,
                    p.grad,
                    state["exp_avg"],
                    state["hessian"],
                    self._direction_divisor(state),
                    lr=lr,
                    wd=wd,
                    beta1=beta1,
                    bias_correction=_bias_correction(beta1, state["step"]),
                    gamma=gamma,
                    eps=eps,
                    clip=clip,
                    scratch=self._scratch,
                    stats=stats,
                )
                if collect_stats:
                    kept, sq = stats
                    n_kept = kept if n_kept is None else n_kept + kept
                    sq_sum = sq if sq_sum is None else sq_sum + sq
                    n_total += p.numel()
        if collect_stats and n_total:
            self._last_step_stats.clear()
            self._last_step_stats["win_rate"] = n_kept.float() / n_total
            self._last_step_stats["update_rms"] = (sq_sum / n_total).sqrt()
        return loss

    def _foreach_group(self, group: dict, params: list[torch.Tensor]) -> bool:
        """One group's eager step with multi-tensor ops; ``False`` (nothing changed) for a ``mu_dtype`` group."""
        states = [self._init_state(p, group) for p in params]
        if any(s["exp_avg"].dtype != p.dtype for s, p in zip(states, params)):
            return False
        steps = [s["step"] for s in states]
        increment_steps(steps)
        beta1, _ = group["betas"]
        if _host_counters(steps):  # CPU counters: read without a device sync
            counts = [t.item() for t in steps]
            bias_correction = {id(p): 1 - beta1**t for p, t in zip(params, counts)}
        else:  # counters on a device, or a step traced by torch.compile: tensors (no sync, no recompiles)
            bias_correction = {id(p): _bias_correction(beta1, t) for p, t in zip(params, steps)}
        masks = [self._direction_divisor(s) for s in states]
        lists = [params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["hessian"] for s in states]]
        if masks[0] is not None:
            lists.append(masks)
        for ps, gs, ms, hs, *rest in by_device_and_dtype(*lists):
            sophia_h_foreach(
                ps, gs, ms, hs, rest[0] if rest else None,
                bias_corrections=[bias_correction[id(p)] for p in ps],
                lr=group["lr"], wd=group["weight_decay"], beta1=beta1,
                gamma=group["gamma"], eps=group["eps"], clip=group["clip_threshold"],
            )
        return True

    def _mask_damp(self) -> int | None:
        """FlatSophia's dampening factor when its mask is in use (``None`` here: no mask)."""
        return None

    def _fused_step(self) -> bool:
        """All groups' updates in one call of the C++ kernel; ``False`` (nothing changed) if it cannot be used."""
        g = gather(self.param_groups, self._init_state, type(self).__name__)
        if not g.params:
            return True
        rows = []
        for group in g.groups:
            clip = group["clip_threshold"]
            rows.append([float(group["lr"]), float(group["weight_decay"]), float(group["betas"][0]),
                         float(group["gamma"]), float(group["eps"]), 0.0 if clip is None else float(clip),
                         float(clip is not None)])
        masks = g.column("mask") if self._mask_damp() is not None else []
        return self._fused.run("sophia_h_step", g.params, g.grads, g.column("exp_avg"), g.column("hessian"), masks,
                               g.column("step"), g.group_index(), rows)

    def _compiled_step(self) -> bool:
        """All groups' updates in one compiled call; ``False`` (nothing changed) if it cannot be used."""
        g = gather(self.param_groups, self._init_state, type(self).__name__)
        if not g.params:
            return True
        exp_avgs = g.column("exp_avg")
        # A mu_dtype other than the parameters' (the kernel stores the momentum in their dtype): eager.
        if any(m.dtype != p.dtype for m, p in zip(exp_avgs, g.params)) or not one_scalar_dtype(g.params):
            return False
        damp = self._mask_damp()
        params, hessians, masks = g.params, g.column("hessian"), g.column("mask") if damp is not None else []
        steps = [step_counter_on(state, p) for state, p in zip(g.states, params)]
        consts = [(group["betas"][0], group["gamma"], group["eps"], group["clip_threshold"], damp)
                  for group in g.groups]
        hp = [[group["lr"], group["weight_decay"]] for group in g.groups]
        return SOPHIA_H_COMPILED(
            params,
            g.grads,
            exp_avgs,
            hessians,
            masks if damp is not None else None,
            steps,
            hyper_tensor(hp, params[0], self._hp_cache),
            tuple(g.counts),
            tuple(consts),
            mode=self.compile if isinstance(self.compile, str) else None,
            static=(params, exp_avgs, hessians, masks, steps),
        )

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics as 0-d tensors (``.item()`` is the only host sync).

        ``win_rate`` and ``update_rms`` come from the last ``step(collect_stats=True)``;
        ``hessian_mean`` and ``hessian_neg_frac`` describe the current Hessian EMA.
        """
        return {**self._last_step_stats, **hessian_ema_stats(self.state.values())}


def _host_counters(steps) -> bool:
    """Read step counters on the host: CPU counters, outside ``torch.compile`` tracing.

    A step wrapped in ``torch.compile`` by the user would otherwise bake each step's count into
    the graph as a constant and recompile on every step.
    """
    return not torch.compiler.is_compiling() and all(t.is_cpu for t in steps)


def _bias_correction(beta1: float, step: torch.Tensor) -> float | torch.Tensor:
    """``1 - beta1 ** t``: a float for a host counter (:func:`_host_counters`), else a 0-d tensor (no sync)."""
    if _host_counters([step]):
        return 1 - beta1 ** step.item()
    return 1 - beta1 ** step.to(torch.float64)


def _parse_dtype(name: str) -> torch.dtype:
    aliases = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
    attr = aliases.get(name, name).removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Invalid mu_dtype: {name!r} (expected one of bfloat16, float16, float32, float64)")
    return dtype
