"""Sophia-G: Sophia with the Gauss-Newton-Bartlett diagonal Hessian estimator.

Paper: Liu, Li, Hall, Liang, Ma, "Sophia: A Scalable Stochastic Second-order Optimizer for Language
Model Pre-training", arXiv:2305.14342 (2023).
Reference code: github.com/Liuhong99/Sophia (``sophia.py``, MIT; on PyPI as ``sophia-opt``).
An independent implementation with the reference's surface and operation order; the tests check it
against ``sophia-opt`` step for step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._base import _SophiaBase
from ._common import (
    by_device_and_dtype,
    check_betas,
    check_bool,
    check_capturable,
    check_foreach,
    check_lr,
    check_nonneg,
    check_positive,
    compute_dtype,
    lr_value,
    parse_dtype,
    refuse_unsupported,
    use_foreach,
    widened,
    write_back,
)

__all__ = ["SophiaG", "sophia_g"]

#: The reference's guard added to the denominator ``rho * bs * h``.
EPS = 1e-15


class SophiaG(_SophiaBase):
    r"""Sophia-G, as the authors' ``SophiaG`` (``sophia-opt``).

    With :math:`m` = ``exp_avg``, :math:`h` = ``hessian``, :math:`g` the gradient and
    :math:`\lambda` = ``weight_decay``, every :meth:`step` does

    .. math::
        \begin{aligned}
        &\theta \leftarrow \theta\,(1 - \mathrm{lr}\,\lambda) \\
        &m \leftarrow \beta_1 m + (1-\beta_1)\, g \qquad\text{(no bias correction)}\\
        &\mathrm{ratio} = \min\!\Big(\frac{|m|}{\max(\rho \cdot \mathrm{bs} \cdot h,\, 0) + 10^{-15}},\ 1\Big)\\
        &\theta \leftarrow \theta - \mathrm{lr}\cdot \mathrm{sign}(m)\cdot \mathrm{ratio}
        \end{aligned}

    and :meth:`update_hessian` (called by the training loop every ``k`` steps, ``k=10`` in the paper)
    does :math:`h \leftarrow \beta_2 h + (1-\beta_2)\,\hat g \odot \hat g`, where :math:`\hat g` is the
    gradient of the mean loss on labels sampled from the model's own softmax (the
    Gauss-Newton-Bartlett estimator, :class:`flatsophia.hessian.GaussNewtonBartlett`).

    ``bs`` is the number of predictions per optimizer step (examples, or sequences x tokens, times
    gradient accumulation, times world size); the paper's :math:`\gamma` is ``rho * bs``. Every
    coordinate moves by at most ``lr`` per step (plus the decay). There is no default: give it to
    every :meth:`step` (``step(bs=n)``, or positionally as the reference: ``step(closure, n)``), or
    once to the constructor or a parameter group; a step without any raises ``ValueError``. (The
    reference's silent default of 5120 sets :math:`\gamma = 0.04 \cdot 5120` whatever the batch.)

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default 1e-4); a number, or a 1-element tensor (read once per step) as
            in ``torch.optim``.
        betas: :math:`(\beta_1, \beta_2)`, rates of the gradient and Hessian EMAs (default (0.965, 0.99)).
        rho: clipping scale (default 0.04).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0.1).
        bs: predictions per step, used when :meth:`step` is called without ``bs`` (default
            ``None``: every step must pass it).
        maximize: maximize the objective instead of minimizing it (default False).
        capturable: ``False`` only (the reference's keyword); for a graph-captured step use
            ``torch.compile(optimizer.step)``.
        foreach: ``True``: multi-tensor kernels (``torch._foreach_*``); ``False``: a loop over
            tensors; ``None`` (default): multi-tensor when all parameters are on CUDA, as in
            ``torch.optim``. Both run the same operations (bit-identical on CPU), also with
            ``collect_stats=True``.
        mu_dtype: dtype of ``exp_avg`` (default ``None``: float32 for bf16/fp16 parameters, else
            the parameter's); e.g. ``torch.bfloat16`` to save memory.
        hessian_dtype: dtype of ``hessian`` (default ``None``: float32 for bf16/fp16 parameters,
            else the parameter's). A bf16 EMA stalls: 2,000 updates of a constant 0.8 from zero
            end at 0.586 (float32 state: 0.8008, bf16's 0.8); pass the parameters' dtype only to
            save its memory.

    **Precision.** Each update is computed in the widest of float32, the parameter's and the
    state's dtypes and written to the parameter with one rounding: in fp16 the reference's
    ``1e-15`` underflows to 0, so a zero gradient over a zero Hessian is 0/0 = NaN there.

    The operations and their order are the reference's: with :math:`h \ge 0` parameters and state
    are bit-identical to ``sophia-opt``'s (float32 and float64, either kernel, on CPU). Differences:
        * :math:`\max(\rho \cdot \mathrm{bs} \cdot h, 0)`: a negative :math:`h` (impossible with
          the estimator, possible with a hand-fed estimate) counts as 0, so the step stays bounded
          by ``lr``; the reference's step there goes uphill, unbounded.
        * ``update_hessian(estimates)`` optionally takes the sampled-label gradients directly
          (e.g. from ``torch.autograd.grad``, all-reduced under DDP); without arguments it reads
          ``p.grad`` as the reference does. A non-finite estimate is skipped with a
          ``RuntimeWarning`` (state untouched) and ``update_hessian`` returns ``False``.
        * Sparse gradients and complex parameters raise ``RuntimeError`` before anything changes.
        * bf16/fp16 parameters get float32 state and arithmetic (see above); the reference keeps
          both in the parameter's dtype.

    ``torch.compile(optimizer.step)`` works.

    In a training loop, :class:`~flatsophia.hessian.HessianRefresher` takes the Gauss-Newton-Bartlett
    estimates and calls :meth:`update_hessian` (every 10th step by default; docs/library.md); each
    step gets ``bs``, here the labels of the batch (times accumulation and world size where they apply)::

        opt = SophiaG(model.parameters(), lr=1e-4)
        refresher = HessianRefresher(opt, model=model)
        for x, y in loader:
            loss = refresher.backward(x, y, F.cross_entropy)
            opt.step(bs=y.numel())
            opt.zero_grad()

    Paper: https://arxiv.org/abs/2305.14342. Reference code: https://github.com/Liuhong99/Sophia.
    """

    hessian_estimator = "gnb"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        bs: float | None = None,
        maximize: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        mu_dtype: torch.dtype | str | None = None,
        hessian_dtype: torch.dtype | str | None = None,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            bs=bs,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            mu_dtype=mu_dtype,
            hessian_dtype=hessian_dtype,
        )
        super().__init__(params, defaults)

    def _check_options(self, options: dict) -> None:
        check_lr(options["lr"])
        check_betas(options["betas"])
        options["betas"] = tuple(options["betas"])
        check_nonneg("rho", options["rho"])
        check_nonneg("weight_decay", options["weight_decay"])
        if options["bs"] is not None:
            check_positive("bs", options["bs"])
        check_bool("maximize", options["maximize"])
        check_capturable(type(self).__name__, options["capturable"])
        check_foreach(options["foreach"])
        options["mu_dtype"] = parse_dtype("mu_dtype", options["mu_dtype"])
        options["hessian_dtype"] = parse_dtype("hessian_dtype", options["hessian_dtype"])

    @torch.no_grad()
    def update_hessian(self, estimates: Sequence[torch.Tensor | None] | None = None) -> bool:
        """Fold a Gauss-Newton-Bartlett sample into the Hessian EMA: ``h = b2*h + (1-b2)*ghat*ghat``.

        Args:
            estimates: the sampled-label gradients ``ghat``, one per :meth:`hessian_params` entry
                (``None`` skips a parameter). When omitted, ``p.grad`` is used for every parameter
                that has one, as in the reference (call right after back-propagating the
                sampled-label loss).

        Returns:
            ``True`` if the EMA was updated; ``False`` if the estimate held NaN/inf and was skipped
            (a ``RuntimeWarning`` is issued; the state is untouched).
        """
        if estimates is None:
            pairs = [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
            refuse_unsupported(type(self).__name__, pairs)
        else:
            pairs = self._estimate_pairs(estimates)
        return self._fold_estimates(pairs)

    def _fold_hessian(self, state: dict, estimate: torch.Tensor, group: dict) -> None:
        beta2 = group["betas"][1]
        state["hessian"].mul_(beta2).addcmul_(estimate, estimate, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable | None = None, bs: float | None = None, *, collect_stats: bool = False):
        """One Sophia-G step.

        Args:
            closure: optional closure re-evaluating the loss (run with gradients enabled).
            bs: predictions per step for this call (examples, or sequences x tokens, x gradient
                accumulation x world size); defaults to each group's ``bs``. Positional as in the
                reference: ``step(None, bs)``.
            collect_stats: also record the win rate (fraction of coordinates not clipped) and the
                RMS of the clipping ratio as 0-d tensors for :meth:`stats`; no host sync.

        Raises:
            ValueError: before anything changes, for a ``bs`` that is not a positive number, or
                when neither this call nor a group with gradients gives one.
        """
        if bs is not None:
            check_positive("bs", bs)
        return self._step(closure, collect_stats, bs=bs)

    def _check_step(self, bs: float | None = None) -> None:
        if bs is not None:
            return
        groups = self.param_groups
        missing = [i for i, g in enumerate(groups) if g["bs"] is None and any(p.grad is not None for p in g["params"])]
        if missing:
            raise ValueError(
                "SophiaG needs bs, the number of predictions per optimizer step (examples, or sequences x "
                "tokens, x gradient accumulation x world size): the clipping scale is gamma = rho * bs. "
                f"Pass step(bs=n), or SophiaG(..., bs=n) (parameter group(s) {missing} have none)"
            )

    def _update_group(self, group, params, grads, exp_avgs, hessians, state_steps, masks, stats, bs=None):
        sophia_g(
            params,
            grads,
            exp_avgs,
            hessians,
            state_steps,
            foreach=group["foreach"],
            lr=lr_value(group["lr"]),
            beta1=group["betas"][0],
            weight_decay=group["weight_decay"],
            scale=group["rho"] * (group["bs"] if bs is None else bs),
            maximize=group["maximize"],
            stats=stats,
        )


def sophia_g(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    *,
    foreach: bool | None = None,
    lr: float,
    beta1: float,
    weight_decay: float,
    scale: float,
    maximize: bool = False,
    stats: list | None = None,
) -> None:
    """Functional Sophia-G step over lists of tensors (see :class:`SophiaG`); ``scale`` is ``rho * bs``.

    ``foreach`` picks the kernel (``None``: multi-tensor when all ``params`` are on CUDA). Each
    update is computed in the widest of float32 and the tensors' dtypes and written back with one
    rounding. With a ``stats`` list, either kernel appends, per tensor, the number of unclipped
    coordinates and the sum of the squared clipping ratios (0-d tensors).
    """
    if use_foreach(foreach, params):
        func = _multi_tensor_sophia_g
    else:
        func = _single_tensor_sophia_g
    func(
        params,
        grads,
        exp_avgs,
        hessians,
        state_steps,
        lr=lr,
        beta1=beta1,
        weight_decay=weight_decay,
        scale=scale,
        maximize=maximize,
        stats=stats,
    )


def _single_tensor_sophia_g(
    params, grads, exp_avgs, hessians, state_steps, *, lr, beta1, weight_decay, scale, maximize, stats
):
    for param, grad, exp_avg, hess, step_t in zip(params, grads, exp_avgs, hessians, state_steps):
        dtype = compute_dtype(param.dtype, exp_avg.dtype, hess.dtype)
        # float32/float64 tensors are updated in place; narrower ones through wider copies
        p, m, h = (t if t.dtype == dtype else t.to(dtype) for t in (param, exp_avg, hess))
        if maximize:
            grad = -grad
        step_t += 1
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        denom = (h * scale).clamp_(min=0).add_(EPS)
        ratio = (m.abs() / denom).clamp_(max=1)
        if stats is not None:
            stats.append(_ratio_stats(ratio))
        p.addcmul_(m.sign(), ratio, value=-lr)
        for target, work in ((param, p), (exp_avg, m)):
            if work is not target:  # one rounding into the narrower dtype
                target.copy_(work)


def _multi_tensor_sophia_g(
    params, grads, exp_avgs, hessians, state_steps, *, lr, beta1, weight_decay, scale, maximize, stats
):
    for ps, gs, ms, hs, steps in by_device_and_dtype(params, grads, exp_avgs, hessians, state_steps):
        dtype = compute_dtype(ps[0].dtype, ms[0].dtype, hs[0].dtype)
        pw, gw, mw, hw = (widened(ts, dtype) for ts in (ps, gs, ms, hs))
        if maximize:
            gw = torch._foreach_neg(gw)
        torch._foreach_add_(steps, 1)
        torch._foreach_mul_(pw, 1 - lr * weight_decay)
        torch._foreach_mul_(mw, beta1)
        torch._foreach_add_(mw, gw, alpha=1 - beta1)
        denom = torch._foreach_mul(hw, scale)
        torch._foreach_clamp_min_(denom, 0.0)
        torch._foreach_add_(denom, EPS)
        ratio = torch._foreach_abs(mw)
        torch._foreach_div_(ratio, denom)
        torch._foreach_clamp_max_(ratio, 1.0)
        if stats is not None:
            stats.extend(_ratio_stats(r) for r in ratio)
        torch._foreach_addcmul_(pw, torch._foreach_sign(mw), ratio, value=-lr)
        write_back(ps, pw)
        write_back(ms, mw)


def _ratio_stats(ratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped coordinates (ratio < 1) and the sum of squared ratios of one tensor (0-d tensors)."""
    return (ratio < 1).sum(), ratio.float().square().sum()
