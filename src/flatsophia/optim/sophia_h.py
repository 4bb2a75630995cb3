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
    check_capturable,
    check_foreach,
    check_lr,
    check_nonneg,
    check_positive,
    compute_dtype,
    get_value,
    lr_value,
    parse_dtype,
    use_foreach,
    widened,
    write_back,
)

__all__ = ["SophiaH", "sophia_h"]


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
        lr: learning rate (default 3e-3, the reference experiment's peak); a number, or a
            1-element tensor (read once per step) as in ``torch.optim``.
        betas: :math:`(\beta_1, \beta_2)` (default (0.965, 0.99)).
        gamma: Hessian scale :math:`\gamma` (default 0.01).
        eps: floor :math:`\epsilon` of the denominator (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 1e-4, the reference's
            ``sophia_h`` default).
        clip_threshold: :math:`c` (default 1.0); ``None`` disables clipping.
        mu_dtype: dtype of ``exp_avg`` (default ``None``: float32 for bf16/fp16 parameters, else
            the parameter's); ``torch.bfloat16`` (or ``"bf16"``) halves its memory, as in the
            reference experiment. As in the reference, the new momentum is formed in the wider
            dtype, used unrounded by the step and stored in ``mu_dtype``.
        hessian_dtype: dtype of the Hessian EMA ``hessian`` (default ``None``: float32 for
            bf16/fp16 parameters, else the parameter's). A bf16 EMA stalls: 2,000 updates of a
            constant 0.8 from zero with ``beta2=0.99`` end at 0.586 (float32 state: 0.8008, bf16's
            0.8); pass the parameters' dtype only to save its memory.
        foreach: ``True``: multi-tensor kernels (``torch._foreach_*``); ``False``: a loop over
            tensors; ``None`` (default): multi-tensor when all parameters are on CUDA, as in
            ``torch.optim``. Both run the same operations (bit-identical on CPU), with any state
            dtypes and with ``collect_stats=True``.
        capturable: ``False`` only (``torch.optim``'s keyword); for a graph-captured step use
            ``torch.compile(optimizer.step)``.

    **Precision.** Each update is computed in the widest of float32, the parameter's and the
    state's dtypes (float32 for bf16/fp16 parameters: fp16 cannot hold ``eps=1e-8``, and a zero
    gradient over a zero Hessian would be 0/0) and written to the parameter with one rounding;
    float32 and float64 parameters with their default state run unchanged.

    A call sequence ``update_hessian(d); step()`` is one reference update with
    ``update_preconditioner=True``; ``step()`` alone is one with ``False``. Each tensor is bias
    corrected with its own step count. Non-finite estimates are skipped with a ``RuntimeWarning``
    (state untouched) and :meth:`update_hessian` returns ``False``. Sparse gradients and complex
    parameters raise ``RuntimeError`` before anything changes. ``torch.compile(optimizer.step)``
    works: while traced, the step counters stay tensors (no recompilation per step).

    In a training loop, :class:`~flatsophia.hessian.HessianRefresher` takes the Hutchinson estimates
    and calls :meth:`update_hessian` (every 10th step by default; docs/library.md)::

        opt = SophiaH(model.parameters(), lr=1e-3)
        refresher = HessianRefresher(opt, model=model)
        for x, y in loader:
            loss = refresher.backward(x, y, F.cross_entropy)
            opt.step()
            opt.zero_grad()

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
        hessian_dtype: torch.dtype | str | None = None,
        foreach: bool | None = None,
        capturable: bool = False,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            mu_dtype=mu_dtype,
            hessian_dtype=hessian_dtype,
            foreach=foreach,
            capturable=capturable,
        )
        super().__init__(params, defaults)

    def _check_options(self, options: dict) -> None:
        check_lr(options["lr"])
        check_betas(options["betas"])
        options["betas"] = tuple(options["betas"])
        check_nonneg("gamma", options["gamma"])
        check_positive("eps", options["eps"])
        check_nonneg("weight_decay", options["weight_decay"])
        if options["clip_threshold"] is not None:
            check_positive("clip_threshold", options["clip_threshold"])
        options["mu_dtype"] = parse_dtype("mu_dtype", options["mu_dtype"])
        options["hessian_dtype"] = parse_dtype("hessian_dtype", options["hessian_dtype"])
        check_foreach(options["foreach"])
        check_capturable(type(self).__name__, options["capturable"])

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
            lr=lr_value(group["lr"]),
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
    kernel (``None``: multi-tensor when all ``params`` are on CUDA). Each update is computed in the
    widest of float32 and the tensors' dtypes and written back with one rounding. With a ``stats``
    list, either kernel appends, per tensor, the number of unclipped coordinates and the sum of the
    squared final direction (0-d tensors).
    """
    if use_foreach(foreach, params):
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
        dtype = compute_dtype(param.dtype, exp_avg.dtype, hess.dtype)
        # float32/float64 tensors are updated in place; narrower ones through wider copies
        p, mu, h = (t if t.dtype == dtype else t.to(dtype) for t in (param, exp_avg, hess))
        step_t += 1
        bias_correction = _bias_correction(beta1, step_t)
        mu.mul_(beta1).add_(grad, alpha=1 - beta1)
        u = mu / bias_correction
        u.div_((h * gamma).clamp_(min=max(eps, torch.finfo(dtype).tiny)))  # eps > 0 also in dtype: no 0/0
        kept = _kept(u, clip_threshold) if stats is not None else None
        if clip_threshold is not None:
            u.clamp_(-clip_threshold, clip_threshold)
        if masks is not None:
            u.div_(masks[i])
        if stats is not None:
            stats.append((kept, u.float().square().sum()))
        u.add_(p, alpha=weight_decay)
        p.add_(u, alpha=-lr)
        for target, work in ((param, p), (exp_avg, mu)):
            if work is not target:  # one rounding into the narrower dtype
                target.copy_(work)


def _multi_tensor_sophia_h(
    params, grads, exp_avgs, hessians, state_steps, masks, *, lr, beta1, gamma, eps, weight_decay, clip_threshold,
    stats,
):
    lists = [params, grads, exp_avgs, hessians, state_steps] + ([masks] if masks is not None else [])
    for ps, gs, ms, hs, steps, *rest in by_device_and_dtype(*lists):
        dtype = compute_dtype(ps[0].dtype, ms[0].dtype, hs[0].dtype)
        pw, gw, mw, hw = (widened(ts, dtype) for ts in (ps, gs, ms, hs))
        torch._foreach_add_(steps, 1)
        bias_corrections = [_bias_correction(beta1, s) for s in steps]
        torch._foreach_mul_(mw, beta1)
        torch._foreach_add_(mw, gw, alpha=1 - beta1)
        u = torch._foreach_div(mw, bias_corrections)
        denom = torch._foreach_mul(hw, gamma)
        torch._foreach_clamp_min_(denom, max(eps, torch.finfo(dtype).tiny))
        torch._foreach_div_(u, denom)
        kept = [_kept(x, clip_threshold) for x in u] if stats is not None else None
        if clip_threshold is not None:
            torch._foreach_clamp_min_(u, -clip_threshold)
            torch._foreach_clamp_max_(u, clip_threshold)
        if rest:
            torch._foreach_div_(u, rest[0])
        if stats is not None:
            stats.extend((k, x.float().square().sum()) for k, x in zip(kept, u))
        torch._foreach_add_(u, pw, alpha=weight_decay)
        torch._foreach_add_(pw, u, alpha=-lr)
        write_back(ps, pw)
        write_back(ms, mw)


def _kept(u: torch.Tensor, clip_threshold: float | None) -> torch.Tensor:
    """Coordinates of the direction ``u`` (before the clip) that the clip leaves alone, as a 0-d tensor."""
    if clip_threshold is None:
        return torch.tensor(u.numel(), device=u.device)
    return (u.abs() < clip_threshold).sum()


def _bias_correction(beta1: float, step_t: torch.Tensor) -> float | torch.Tensor:
    """``1 - beta1 ** t``: a float from the host count, or, while ``torch.compile`` traces, a 0-d
    tensor computed in float64 like the float (the counter itself is float32)."""
    step = get_value(step_t)
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)
    return 1 - beta1**step
