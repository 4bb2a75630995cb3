"""Sophia-H: Sophia with the Hutchinson diagonal Hessian estimator.

Paper: Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv:2305.14342 (2023).
Update rule as in the FlatSophia reference (github.com/evanatyourservice/flat-sophia,
``flat_sophia.py``, ``scale_by_sophia_h`` with ``project_to_flat=False``; JAX/optax, MIT), of which
this is an independent PyTorch implementation. :class:`~flatsophia.optim.FlatSophia` adds the
sharpness mask (the ``masks`` of :func:`sophia_h`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._base import _SophiaBase
from ._common import (
    by_device_and_dtype,
    check_betas,
    check_foreach,
    check_nonneg,
    check_positive,
    get_value,
    use_foreach,
)

__all__ = ["SophiaH", "sophia_h"]

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


class SophiaH(_SophiaBase):
    r"""Sophia-H, as the flat-sophia reference's ``scale_by_sophia_h``.

    With :math:`\mu` = ``exp_avg``, :math:`\nu` = ``hessian``, :math:`g` the gradient, :math:`t` the
    step count, :math:`\lambda` = ``weight_decay`` and :math:`c` = ``clip_threshold``, every
    :meth:`step` does

    .. math::
        \begin{aligned}
        &\mu \leftarrow \beta_1 \mu + (1-\beta_1)\, g, \qquad \hat\mu = \mu / (1-\beta_1^t)\\
        &u = \hat\mu / \max(\gamma \nu, \epsilon), \qquad u \leftarrow \mathrm{clip}(u, -c, c)\\
        &\theta \leftarrow \theta - \mathrm{lr}\,(u + \lambda \theta)
        \end{aligned}

    and :meth:`update_hessian`, given a Hutchinson estimate :math:`d = v \odot Hv` of the Hessian
    diagonal (every ``k`` steps), does :math:`\nu \leftarrow \beta_2 \nu + (1-\beta_2)\, d` (no bias
    correction; :math:`\nu` may be negative). Where :math:`\gamma\nu \le \epsilon` the denominator
    is :math:`\epsilon`, so :math:`|u|` hits the clip and the step is bounded by
    :math:`\mathrm{lr}\cdot c` per coordinate (plus the decay).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 3e-3, the reference experiment's peak).
        betas: :math:`(\beta_1, \beta_2)` (default (0.965, 0.99)).
        gamma: Hessian scale :math:`\gamma` (default 0.01).
        eps: floor :math:`\epsilon` of the denominator (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 1e-4, the reference's
            ``sophia_h`` default).
        clip_threshold: :math:`c` (default 1.0); ``None`` disables clipping.
        mu_dtype: dtype of ``exp_avg`` (default ``None``: the parameter's); ``torch.bfloat16``
            (or ``"bf16"``) halves its memory, as in the reference experiment. As in the reference,
            the new momentum is formed in the wider of the two dtypes, used unrounded by the step
            and stored in ``mu_dtype``.
        foreach: ``True``: multi-tensor kernels (``torch._foreach_*``); ``False``: a loop over
            tensors; ``None`` (default): multi-tensor when all parameters are on CUDA, as in
            ``torch.optim``. Both run the same operations (bit-identical on CPU). Groups whose
            ``mu_dtype`` differs from the parameters' dtype, and steps with ``collect_stats=True``,
            use the loop.

    A call sequence ``update_hessian(d); step()`` is one reference update with
    ``update_preconditioner=True``; ``step()`` alone is one with ``False``. Each tensor is bias
    corrected with its own step count. Non-finite estimates are skipped with a ``RuntimeWarning``
    (state untouched) and :meth:`update_hessian` returns ``False``. Sparse gradients and complex
    parameters raise ``RuntimeError`` before anything changes. ``torch.compile(optimizer.step)``
    works: while traced, the step counters stay tensors (no recompilation per step).

    Paper: https://arxiv.org/abs/2305.14342. Reference code:
    https://github.com/evanatyourservice/flat-sophia (``scale_by_sophia_h``).
    """

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
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            mu_dtype=mu_dtype,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def _check_options(self, options: dict) -> None:
        check_nonneg("learning rate", options["lr"])
        check_betas(options["betas"])
        options["betas"] = tuple(options["betas"])
        check_nonneg("gamma", options["gamma"])
        check_positive("eps", options["eps"])
        check_nonneg("weight_decay", options["weight_decay"])
        if options["clip_threshold"] is not None:
            check_positive("clip_threshold", options["clip_threshold"])
        options["mu_dtype"] = _parse_dtype(options["mu_dtype"])
        check_foreach(options["foreach"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a name such as "bf16" from an older state dict
            group["mu_dtype"] = _parse_dtype(group["mu_dtype"])

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping a ``mu_dtype`` momentum and the int8 mask.

        The base class casts every state tensor but ``step`` to the parameter's dtype; the momentum
        (in ``mu_dtype``) and FlatSophia's mask (int8) are taken again from the saved tensors here, so
        a momentum wider than the parameters (float32 under bfloat16) keeps every bit.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, pairs):
            old = saved.get(pid, {})
            if "exp_avg" in old:
                self.state[p]["exp_avg"] = old["exp_avg"].to(device=p.device, dtype=group["mu_dtype"] or p.dtype)
            if "mask" in old:
                self.state[p]["mask"] = old["mask"].to(device=p.device, dtype=torch.int8)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            mu_dtype = group["mu_dtype"] or p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=mu_dtype, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None]) -> bool:
        """Fold one Hutchinson estimate ``d = v * (H v)`` per parameter into the Hessian EMA.

        Args:
            estimates: one tensor per entry of :meth:`hessian_params` (``None`` for a parameter the
                loss does not depend on), e.g. from :class:`flatsophia.hessian.Hutchinson`.

        Returns:
            ``True`` if the state was updated; ``False`` if the estimate held NaN/inf and was skipped
            (a ``RuntimeWarning`` is issued; the state is untouched).
        """
        return self._fold_estimates(self._estimate_pairs(estimates))

    def _fold_hessian(self, state: dict, estimate: torch.Tensor, group: dict) -> None:
        beta2 = group["betas"][1]
        state["hessian"].mul_(beta2).add_(estimate, alpha=1 - beta2)

    def _update_group(self, group, params, grads, exp_avgs, hessians, state_steps, masks, stats):
        sophia_h(
            params,
            grads,
            exp_avgs,
            hessians,
            state_steps,
            masks or None,
            foreach=group["foreach"],
            lr=group["lr"],
            beta1=group["betas"][0],
            gamma=group["gamma"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            clip_threshold=group["clip_threshold"],
            stats=stats,
        )


def sophia_h(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    masks: list[torch.Tensor] | None = None,
    *,
    foreach: bool | None = None,
    lr: float,
    beta1: float,
    gamma: float,
    eps: float,
    weight_decay: float,
    clip_threshold: float | None,
    stats: list | None = None,
) -> None:
    """Functional Sophia-H step over lists of tensors (see :class:`SophiaH`).

    ``masks`` (FlatSophia): int8 tensors the clipped direction is divided by. ``foreach`` picks the
    kernel (``None``: multi-tensor when all ``params`` are on CUDA); the single-tensor kernel runs
    when an ``exp_avg`` has another dtype than its parameter (``mu_dtype``) or a ``stats`` list is
    given, to which it appends, per tensor, the number of unclipped coordinates and the sum of the
    squared final direction (0-d tensors).
    """
    if stats is None and use_foreach(foreach, params) and all(m.dtype == p.dtype for m, p in zip(exp_avgs, params)):
        func = _multi_tensor_sophia_h
    else:
        func = _single_tensor_sophia_h
    func(
        params,
        grads,
        exp_avgs,
        hessians,
        state_steps,
        masks,
        lr=lr,
        beta1=beta1,
        gamma=gamma,
        eps=eps,
        weight_decay=weight_decay,
        clip_threshold=clip_threshold,
        stats=stats,
    )


def _single_tensor_sophia_h(
    params, grads, exp_avgs, hessians, state_steps, masks, *, lr, beta1, gamma, eps, weight_decay, clip_threshold,
    stats,
):
    for i, (param, grad, exp_avg, hess, step_t) in enumerate(zip(params, grads, exp_avgs, hessians, state_steps)):
        step_t += 1
        bias_correction = _bias_correction(beta1, step_t)
        if exp_avg.dtype == param.dtype:
            mu = exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        else:  # mu_dtype: formed in the wider dtype, stored rounded, used unrounded
            mu = exp_avg.to(torch.promote_types(param.dtype, exp_avg.dtype))
            mu.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg.copy_(mu)
        u = mu / bias_correction
        u.div_((hess * gamma).clamp_(min=eps))
        if stats is not None:
            kept = (u.abs() < clip_threshold).sum() if clip_threshold is not None else torch.tensor(u.numel())
        if clip_threshold is not None:
            u.clamp_(-clip_threshold, clip_threshold)
        if masks is not None:
            u.div_(masks[i])
        if stats is not None:
            stats.append((kept.to(u.device), u.float().square().sum()))
        u.add_(param, alpha=weight_decay)
        param.add_(u, alpha=-lr)


def _multi_tensor_sophia_h(
    params, grads, exp_avgs, hessians, state_steps, masks, *, lr, beta1, gamma, eps, weight_decay, clip_threshold,
    stats,
):
    lists = [params, grads, exp_avgs, hessians, state_steps] + ([masks] if masks is not None else [])
    for ps, gs, ms, hs, steps, *rest in by_device_and_dtype(*lists):
        torch._foreach_add_(steps, 1)
        bias_corrections = [_bias_correction(beta1, s) for s in steps]
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1 - beta1)
        u = torch._foreach_div(ms, bias_corrections)
        denom = torch._foreach_mul(hs, gamma)
        torch._foreach_clamp_min_(denom, eps)
        torch._foreach_div_(u, denom)
        if clip_threshold is not None:
            torch._foreach_clamp_min_(u, -clip_threshold)
            torch._foreach_clamp_max_(u, clip_threshold)
        if rest:
            torch._foreach_div_(u, rest[0])
        torch._foreach_add_(u, ps, alpha=weight_decay)
        torch._foreach_add_(ps, u, alpha=-lr)


def _bias_correction(beta1: float, step_t: torch.Tensor) -> float | torch.Tensor:
    """``1 - beta1 ** t``: a float from the host count, or, while ``torch.compile`` traces, a 0-d
    tensor computed in float64 like the float (the counter itself is float32)."""
    step = get_value(step_t)
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)
    return 1 - beta1**step


def _parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``mu_dtype`` as a floating ``torch.dtype`` (or ``None``); names such as ``"bf16"`` are accepted."""
    if isinstance(value, str):
        attr = _DTYPE_ALIASES.get(value, value).removeprefix("torch.")
        parsed = getattr(torch, attr, None)
        if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
            raise ValueError(f"Invalid mu_dtype: {value!r} (expected one of bfloat16, float16, float32, float64)")
        return parsed
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"Invalid mu_dtype: {value!r} (expected None or a floating torch.dtype)")
    return value
