"""Sophia-G: Sophia with the Gauss-Newton-Bartlett diagonal Hessian estimator.

Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", arXiv:2305.14342 (2023).
Reference code: github.com/Liuhong99/Sophia (``sophia.py``, MIT; on PyPI as ``sophia-opt``).
This is an independent implementation with the same surface and the same arithmetic; the test suite
checks it against ``sophia-opt`` step for step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from ._common import (
    Gathered,
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
    SOPHIA_G_COMPILED,
    SOPHIA_G_EPS,
    NonnegRecord,
    Scratch,
    by_device_and_dtype,
    check_compile,
    check_foreach,
    foreach_split,
    hyper_tensor,
    increment_steps,
    one_scalar_dtype,
    sophia_g_eager,
    sophia_g_foreach,
    step_counter_on,
)

__all__ = ["SophiaG"]


class SophiaG(Optimizer):
    r"""Sophia-G (authors' variant, as in ``sophia-opt``).

    .. math::
        \begin{aligned}
        &\theta \leftarrow \theta (1 - \eta\lambda) \\
        &m \leftarrow \beta_1 m + (1-\beta_1) g \qquad\text{(no bias correction)}\\
        &\theta \leftarrow \theta - \eta\, \mathrm{sign}(m)\,
            \min\!\Big(\frac{|m|}{\rho \cdot bs \cdot h + 10^{-15}}, 1\Big)
        \end{aligned}

    and, when the training loop calls :meth:`update_hessian` (every ``k`` steps, ``k=10`` in the
    paper), :math:`h \leftarrow \beta_2 h + (1-\beta_2)\,\hat g \odot \hat g`, where :math:`\hat g`
    is the gradient of the mean loss on labels sampled from the model's own softmax
    (the Gauss-Newton-Bartlett estimator, :class:`flatsophia.hessian.GaussNewtonBartlett`).

    ``bs`` is the number of predictions per optimizer step (examples, or sequences x tokens, times
    gradient accumulation, times world size). The paper's :math:`\gamma` equals ``rho * bs``; the
    clip threshold is 1 and the update of every coordinate is bounded by ``lr``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (default 1e-4).
        betas: :math:`(\beta_1, \beta_2)` for the gradient and Hessian EMAs (default (0.965, 0.99)).
        rho: clipping scale (default 0.04); :math:`\gamma = \rho \cdot bs`.
        weight_decay: decoupled weight decay :math:`\lambda` (default 0.1).
        bs: predictions per step used by :meth:`step` when it is called without ``bs``
            (default 5120, the reference's default). Set it once here (or per group) instead of
            passing it to every ``step`` call.
        maximize: maximize the objective instead of minimizing.
        compile: ``True`` runs the step as one ``torch.compile``d call for all groups (fused
            kernels; the first step compiles); ``"reduce-overhead"`` also replays it as a CUDA
            graph on GPU (the fastest GPU step; one extra gradient-sized buffer; same as ``True``
            on CPU). Falls back to the eager step, logging why, where compilation fails. The
            compiled arithmetic may differ from the eager one in the last bits (fused multiply-add).
        fused: ``True`` runs the step on CPU as one call of a C++ kernel over all groups (one pass
            over memory; the extension is compiled on first use, ~25 s, and cached). Takes
            precedence over ``compile`` where it applies: CPU float32/float64 parameters whose
            gradient and state share their dtype and layout, steps without ``collect_stats``;
            elsewhere (CUDA, no C++ compiler) the ``compile`` or eager step runs, logging why once.
            Same arithmetic as ``compile=True``.
        foreach: ``True``: eager step with multi-tensor ops (one kernel launch per operation for
            all tensors of a device and dtype); ``False``: a loop over tensors. ``None`` (default):
            multi-tensor when all parameters are on CUDA, as in ``torch.optim``; on CPU,
            multi-tensor for tensors under 65,536 elements (dispatch-bound) and the loop for larger
            ones. Same arithmetic either way (bit-identical on CPU). Steps with
            ``collect_stats=True`` use the loop.

    Deliberate differences from the reference (none change results for valid states beyond rounding):
        * ``update_hessian(estimates)`` optionally takes the sampled-label gradients directly
          (e.g. computed with ``torch.autograd.grad`` and all-reduced under DDP); without arguments
          it reads ``p.grad`` exactly like the reference.
        * A non-finite Hessian estimate is skipped with a warning (the EMA keeps its old value)
          instead of poisoning the state; :meth:`update_hessian` returns ``False`` then.
        * The denominator is ``max(rho*bs*h, 0) + 1e-15``, so a negative ``h`` (impossible with the
          estimator, possible with a hand-fed estimate) still gives a step bounded by ``lr``.
        * The eager step computes the same update in fewer passes over memory (momentum by
          ``lerp``, the division by ``rho * bs`` moved out of the per-element work), so it agrees
          with the reference up to rounding, not bit for bit: over 80 steps of the parity test,
          max parameter difference ~1e-6 in float32 (both sides' rounding; ours drifts 3x less
          than the reference from a float64 run) and ~3e-16 in float64.
    """

    is_second_order = True
    hessian_estimator = "gnb"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        bs: int = 5120,
        maximize: bool = False,
        compile: bool | str = False,
        fused: bool = False,
        foreach: bool | None = None,
    ):
        check_nonneg("learning rate", lr)
        check_foreach(foreach)
        check_betas(betas)
        check_nonneg("rho", rho)
        check_nonneg("weight_decay", weight_decay)
        check_positive("bs", bs)
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, bs=bs, maximize=maximize)
        super().__init__(params, defaults)
        # Mutated in place only (never rebound): Lightning's optimizer wrapper copies __dict__.
        self._last_step_stats: dict[str, torch.Tensor] = {}
        self._scratch = Scratch()
        self._hp_cache: dict = {}
        # Hessian buffers known to be >= 0 (true of every EMA this class builds): their step skips
        # the denominator's clamp, an identity then.
        self._nonneg = NonnegRecord()
        self.compile = check_compile(compile)
        check_bool("fused", fused)
        self.fused = fused
        self._fused = FusedStep()
        self.foreach = foreach

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("bs", 5120)
            group.setdefault("maximize", False)
        self.__dict__.setdefault("_last_step_stats", {})
        self.__dict__.setdefault("_scratch", Scratch())
        self.__dict__.setdefault("_hp_cache", {})
        self.__dict__.setdefault("_nonneg", NonnegRecord())
        self.__dict__.setdefault("compile", False)
        self.__dict__.setdefault("fused", False)
        self.__dict__.setdefault("_fused", FusedStep())
        self.__dict__.setdefault("foreach", None)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, device=p.device if self.compile else None)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._nonneg.mark(state["hessian"])
        return state

    def hessian_params(self) -> list[torch.Tensor]:
        """Parameters :meth:`update_hessian` expects estimates for (``requires_grad``, group order)."""
        return hessian_params(self.param_groups)

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None] | None = None) -> bool:
        """Fold a Gauss-Newton-Bartlett sample into the Hessian EMA: ``h = b2*h + (1-b2)*ghat*ghat``.

        Args:
            estimates: the sampled-label gradients ``ghat``, one per :meth:`hessian_params` entry
                (``None`` skips a parameter). When omitted, ``p.grad`` is used for every parameter
                that has one, as in the reference (call right after back-propagating the
                sampled-label loss).

        Returns:
            ``True`` if the EMA was updated, ``False`` if the estimate was skipped because it held a
            non-finite value (a ``RuntimeWarning`` is issued; the state is untouched).
        """
        if estimates is None:
            pairs = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        else:
            params = self.hessian_params()
            check_estimates(params, estimates)
            pairs = [(p, e) for p, e in zip(params, estimates) if e is not None]
        if not all_finite(e for _, e in pairs):
            warnings.warn(
                "SophiaG.update_hessian: the Hessian estimate holds NaN/inf; skipped (EMA unchanged).",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        beta2 = {id(p): g["betas"][1] for g in self.param_groups for p in g["params"]}
        unverified = []
        for p, e in pairs:
            h = self._init_state(p)["hessian"]
            b2 = beta2[id(p)]
            was_nonneg = 0 <= b2 <= 1 and self._nonneg.holds(h)
            h.mul_(b2).addcmul_(e, e, value=1 - b2)
            if was_nonneg:  # b2 * h + (1 - b2) * e * e >= 0
                self._nonneg.mark(h)
            else:  # e.g. a state loaded from a checkpoint: check once
                unverified.append(h)
        self._nonneg.verify(unverified)
        return True

    @torch.no_grad()
    def step(self, closure: Callable | None = None, bs: float | None = None, collect_stats: bool = False):
        """One Sophia-G step.

        Args:
            closure: optional closure re-evaluating the loss.
            bs: predictions per step for this call; defaults to each group's ``bs``.
            collect_stats: also record the win rate (fraction of coordinates not clipped) and the
                update RMS as 0-d tensors, read with :meth:`stats` (no host sync here).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if bs is not None:
            check_positive("bs", bs)
        if self.fused and not collect_stats and self._fused_step(bs):
            return loss
        if self.compile and not collect_stats and self._compiled_step(bs):
            return loss
        n_kept = n_total = sq_sum = None
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            scale = hessian_scale(group, bs)
            pairs = list(params_with_grad(group, "SophiaG"))
            multi = [False] * len(pairs) if collect_stats else foreach_split(self.foreach, [p for p, _ in pairs])
            if any(multi):
                self._foreach_group(group, [pair for pair, m in zip(pairs, multi) if m], scale)
            for (p, grad), m in zip(pairs, multi):
                if m:
                    continue
                state = self._init_state(p)
                state["step"] += 1
                grad = -grad if group["maximize"] else grad
                x, x_bound = sophia_g_eager(
                    p, grad, state["exp_avg"], state["hessian"], lr=lr, wd=wd, beta1=beta1, scale=scale,
                    scratch=self._scratch, hess_nonneg=self._nonneg.holds(state["hessian"]),
                )
                if collect_stats:  # |clipping ratio| = |x| / x_bound, clipped at 1
                    kept = (x.abs() < x_bound).sum()
                    sq = (x / x_bound).square().sum()
                    n_kept = kept if n_kept is None else n_kept + kept
                    sq_sum = sq if sq_sum is None else sq_sum + sq
                    n_total = p.numel() + (n_total or 0)
        if collect_stats and n_total:
            self._last_step_stats.clear()
            self._last_step_stats["win_rate"] = n_kept.float() / n_total
            self._last_step_stats["update_rms"] = (sq_sum.float() / n_total).sqrt()
        return loss

    def _foreach_group(self, group: dict, pairs: list, scale: float) -> None:
        """The eager step of ``pairs`` (parameter, gradient) of one group with multi-tensor ops."""
        states = [self._init_state(p) for p, _ in pairs]
        increment_steps([s["step"] for s in states])
        grads = [g for _, g in pairs]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        hessians = [s["hessian"] for s in states]
        nonneg = all(self._nonneg.holds(h) for h in hessians)
        exp_avgs = [s["exp_avg"] for s in states]
        for ps, gs, ms, hs in by_device_and_dtype([p for p, _ in pairs], grads, exp_avgs, hessians):
            sophia_g_foreach(
                ps, gs, ms, hs, lr=group["lr"], wd=group["weight_decay"], beta1=group["betas"][0], scale=scale,
                hess_nonneg=nonneg,
            )

    def _gather(self) -> Gathered:
        return gather(self.param_groups, lambda p, group: self._init_state(p), "SophiaG")

    def _fused_step(self, bs: float | None) -> bool:
        """All groups' updates in one call of the C++ kernel; ``False`` (nothing changed) if it cannot be used."""
        g = self._gather()
        if not g.params:
            return True
        rows = [[float(group["lr"]), float(group["weight_decay"]), float(group["betas"][0]),
                 float(hessian_scale(group, bs)), -1.0 if group["maximize"] else 1.0]
                for group in g.groups]
        return self._fused.run("sophia_g_step", g.params, g.grads, g.column("exp_avg"), g.column("hessian"),
                               g.column("step"), g.group_index(), rows, SOPHIA_G_EPS)

    def _compiled_step(self, bs: float | None) -> bool:
        """All groups' updates in one compiled call; ``False`` (nothing changed) if it cannot be used."""
        g = self._gather()
        if not g.params:
            return True
        if not one_scalar_dtype(g.params):
            return False
        params, exp_avgs, hessians = g.params, g.column("exp_avg"), g.column("hessian")
        grads = [-grad if g.groups[i]["maximize"] else grad for grad, i in zip(g.grads, g.group_index())]
        steps = [step_counter_on(state, p) for state, p in zip(g.states, params)]
        hp = [[group["lr"], group["weight_decay"], hessian_scale(group, bs)] for group in g.groups]
        return SOPHIA_G_COMPILED(
            params,
            grads,
            exp_avgs,
            hessians,
            steps,
            hyper_tensor(hp, params[0], self._hp_cache),
            tuple(g.counts),
            tuple(group["betas"][0] for group in g.groups),
            mode=self.compile if isinstance(self.compile, str) else None,
            static=(params, exp_avgs, hessians, steps),
        )

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics as 0-d tensors (call ``.item()`` to read them; that is the only host sync).

        ``win_rate`` (fraction of coordinates not clipped) and ``update_rms`` (RMS of the
        preconditioned direction, before ``lr``) come from the last ``step(collect_stats=True)``;
        ``hessian_mean`` and ``hessian_neg_frac`` describe the current Hessian EMA.
        """
        return {**self._last_step_stats, **hessian_ema_stats(self.state.values())}


def hessian_scale(group: dict, bs: float | None) -> float:
    """The Hessian's scale in the denominator, ``rho * bs`` (the authors' ``rho * bs``: ``gamma * B``),
    with ``step(bs=...)`` overriding the group's ``bs``."""
    return group["rho"] * (bs if bs is not None else group["bs"])
