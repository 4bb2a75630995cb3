"""Step kernels of the Sophia family: eager (per tensor or multi-tensor) and ``torch.compile``d.

Per-tensor eager kernels write their temporaries into one scratch buffer sized for the largest
parameter (FlatSophia: a second one for the float copy of its int8 mask) instead of allocating
fresh tensors every step: on CPU a large fresh allocation is page-faulted and zeroed by the kernel,
which costs about as much as the arithmetic, and one reused buffer keeps a step's working set in
the last-level cache.

Multi-tensor (``foreach``) eager kernels run the same operations in the same order on whole lists
of tensors (``torch._foreach_*``: one launch per operation for all tensors of a device and dtype
instead of one per tensor), the default on CUDA, where a per-tensor step is bound by kernel
launches. On CPU the ``foreach`` ops run tensor by tensor, so both forms give the same bits there.

Compiled kernels take every hyperparameter that changes between steps (learning rate, bias
correction, ``rho * bs``) as a 0-d tensor, so a schedule does not trigger recompilation; Inductor
fuses each parameter's update into one pass over memory. They are opt-in (``compile=True``) and
fall back to the eager kernels, with the reason logged once, wherever compilation fails.
"""

from __future__ import annotations

import logging
import weakref

import torch

log = logging.getLogger(__name__)

#: The reference's guard added to Sophia-G's denominator ``rho * bs * h``.
SOPHIA_G_EPS = 1e-15


class Scratch:
    """Reusable flat buffers, one per (slot, dtype, device), grown to the largest request."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[: like.numel()].view(like.shape)

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-d zero of ``like``'s dtype and device (the broadcast ``input`` of ``addcdiv``)."""
        key = ("zero", like.dtype, like.device)
        z = self._buffers.get(key)
        if z is None:
            z = self._buffers[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return z

    def clear(self) -> None:
        self._buffers.clear()


class NonnegRecord:
    """Tensors known to hold no negative value, until they are next modified in place.

    A record is the tensor's weak reference and its version counter (``Tensor._version``, bumped by
    every in-place write): a tensor replaced (``load_state_dict``), freed, or written by anyone
    after it was recorded no longer counts. Not part of the optimizer state (nothing to save).
    """

    def __init__(self):
        self._records: dict[int, tuple[weakref.ref, int]] = {}

    def mark(self, t: torch.Tensor) -> None:
        self._records[id(t)] = (weakref.ref(t), t._version)

    def holds(self, t: torch.Tensor) -> bool:
        rec = self._records.get(id(t))
        return rec is not None and rec[0]() is t and rec[1] == t._version

    def verify(self, tensors: list[torch.Tensor]) -> None:
        """Record those of ``tensors`` whose minimum is >= 0 (one host sync for all of them).

        Also drops the records of freed tensors (e.g. the buffers a ``load_state_dict`` replaced).
        """
        self._records = {k: rec for k, rec in self._records.items() if rec[0]() is not None}
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in tensors:
            if t.numel():
                by_device.setdefault(t.device, []).append(t)
        for ts in by_device.values():
            mins = torch.stack([t.min().to(torch.float64) for t in ts]).tolist()
            for t, lo in zip(ts, mins):
                if lo >= 0:  # False for NaN
                    self.mark(t)


# --------------------------------------------------------------------------- eager kernels
#: Below this ``rho * bs``, Sophia-G's eager step keeps the unscaled form (``eps / scale`` and the
#: ``1 / scale`` step size would leave float32's range).
_G_MIN_SCALE = 1e-20


def lerp_factor(lr, wd, step_per_lr, bound, p: torch.Tensor, x: torch.Tensor):
    """``k`` such that ``p.lerp_(k * c, lr * wd)`` is the decayed update ``p * (1 - lr * wd) - lr * step_per_lr * c``.

    ``lerp`` computes ``p + w * (e - p)`` in one pass over ``p``, where the decay and the update
    take two (``p.mul_``, ``p.add_``); with ``k = -step_per_lr / wd`` the two agree up to rounding,
    and the rounding error of ``e - p`` is relative to the update and the decay, not to ``p``.
    ``None`` (use the two-pass form) unless both forms are plain-number arithmetic on one dtype
    and the scaled values stay far inside the dtype's range: ``wd != 0``, a finite ``bound``
    on ``|c|`` (the clip), Python-number ``lr``/``wd``/``step_per_lr``, ``x`` of ``p``'s dtype.
    """
    plain = (int, float)
    if not (isinstance(lr, plain) and isinstance(wd, plain) and isinstance(step_per_lr, plain)):
        return None
    if wd == 0 or not isinstance(bound, plain) or x.dtype != p.dtype:
        return None
    k = -step_per_lr / wd
    fmax = torch.finfo(x.dtype).max
    # |k| * bound bounds the lerp's target; |k| <= fmax * 2**-40 keeps the division's intermediate
    # k * mu finite for any |mu| < 2**40 (float32, bfloat16; float16 always takes the two-pass form).
    if not (abs(k) * bound <= fmax / 16 and abs(k) <= fmax * 2.0**-40):  # also False for inf/NaN
        return None
    return k


def sophia_g_eager(p, grad, exp_avg, hess, *, lr, wd, beta1, scale, scratch: Scratch, hess_nonneg: bool = False):
    """One Sophia-G update of one tensor, in five passes over memory (the authors' code makes ~10).

    The reference's ``theta -= lr * (sign(m) * min(|m| / (s*h + eps), 1) + wd * theta)`` with
    ``m = beta1 * m + (1 - beta1) * g``, computed for ``s = rho * bs > 0`` as
    ``theta = theta * (1 - lr*wd) - (lr/s) * clamp(m / (h + eps/s), -s, s)`` with ``m`` updated by
    ``lerp``: the same update up to rounding (the division by ``s`` is moved out of the
    per-element work). With weight decay, the decay and the update are one ``lerp`` of the
    parameter towards ``k * direction`` (:func:`lerp_factor`; ``k`` is folded into the division and
    the clip). A negative ``h`` (impossible with the estimator) is treated as 0, i.e. the
    denominator is ``max(s*h, 0) + eps``; ``hess_nonneg=True`` (the caller knows ``h >= 0``) skips
    that clamp, an identity then. Returns ``(direction, bound)``: the clipped direction (a scratch
    view, possibly scaled by a negative factor) and its clip bound (``|ratio| = |direction| / bound``),
    for diagnostics.
    """
    k = None if scale < _G_MIN_SCALE else lerp_factor(lr, wd, 1 / scale, scale, p, exp_avg)
    if k is None:
        p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    if scale < _G_MIN_SCALE:  # rho = 0 or tiny: the unscaled form (the denominator is ~eps)
        denom = torch.mul(hess, scale, out=scratch.get(0, p)).add_(SOPHIA_G_EPS).clamp_(min=SOPHIA_G_EPS)
        ratio = torch.div(exp_avg, denom, out=denom).clamp_(-1, 1)
        p.add_(ratio, alpha=-lr)
        return ratio, 1.0
    floor = SOPHIA_G_EPS / scale
    # One scratch buffer: the denominator is overwritten by the direction (elementwise, same index).
    denom = torch.add(hess, floor, out=scratch.get(0, p))
    if not hess_nonneg:
        denom.clamp_(min=floor)
    if k is None:
        x = torch.div(exp_avg, denom, out=denom).clamp_(-scale, scale)
        p.add_(x, alpha=-lr / scale)
        return x, scale
    # The decay folded into one lerp: x = k * m / denom (k < 0), clipped at |k| * scale.
    bound = abs(k) * scale
    x = torch.addcdiv(scratch.zero(p), exp_avg, denom, value=k, out=denom).clamp_(-bound, bound)
    p.lerp_(x, lr * wd)
    return x, bound


#: ``eps / gamma`` above this is treated as ``gamma = 0`` (the floor would overflow float32).
_MAX_H_FLOOR = 1e30


def sophia_h_scale(bias_correction, gamma: float, eps: float):
    """``(h_floor, s)`` with ``mu / bias_correction / max(gamma * nu, eps) == s * mu / max(nu, h_floor)``.

    For ``gamma > 0``: ``max(gamma * nu, eps) = gamma * max(nu, eps / gamma)``, so ``s = 1 / (bc * gamma)``;
    for ``gamma = 0`` the denominator is ``eps`` everywhere (``h_floor=None``: no division by ``nu``).
    ``bias_correction`` may be a 0-d tensor (a counter on the device); ``s`` is then one too.
    """
    if gamma > 0 and eps / gamma <= _MAX_H_FLOOR:
        return eps / gamma, 1 / (bias_correction * gamma)
    return None, 1 / (bias_correction * eps)


def sophia_h_eager(p, grad, exp_avg, hess, divisor, *, lr, wd, beta1, bias_correction, gamma, eps, clip,
                   scratch: Scratch, stats: list | None = None):
    """One Sophia-H update of one tensor (FlatSophia's with an int8 ``divisor``) in five passes over
    memory (FlatSophia: plus a light one converting the int8 mask and one dividing by it).

    ``theta -= lr * (clip(mu_hat / max(gamma * nu, eps), c) / mask + wd * theta)`` is computed as
    ``theta = theta * (1 - lr * wd) - lr * s * clip(x, c / s) / mask`` with ``x = mu / max(nu, eps / gamma)``
    and ``s = 1 / (bias_correction * gamma) > 0`` (:func:`sophia_h_scale`): the same update up to
    rounding, without materialising the bias-corrected momentum or the scaled Hessian. With weight
    decay and a clip, the decay and the update are one ``lerp`` of the parameter towards ``k * x``
    (:func:`lerp_factor`; ``k`` is folded into the division and the clip). The momentum is formed in
    the wider of the parameter's and ``exp_avg``'s dtypes and stored in ``exp_avg``'s. ``stats`` (a
    list) receives ``(n_kept, sum of squares of the final direction)`` as 0-d tensors.
    """
    mu = exp_avg.to(torch.promote_types(p.dtype, exp_avg.dtype))
    mu.lerp_(grad if grad.dtype == mu.dtype else grad.to(mu.dtype), 1 - beta1)
    if mu is not exp_avg:
        exp_avg.copy_(mu)
    h_floor, s = sophia_h_scale(bias_correction, gamma, eps)
    bound = None if clip is None else clip / s
    k = lerp_factor(lr, wd, s, bound, p, mu)
    # One scratch buffer: the clamped Hessian is overwritten by the direction (elementwise, same index).
    x = scratch.get(0, mu)
    if k is not None:  # x = k * mu / max(nu, floor): |x| / |k| is the unscaled direction
        if h_floor is None:
            torch.mul(mu, k, out=x)
        else:
            torch.addcdiv(scratch.zero(mu), mu, torch.clamp(hess, min=h_floor, out=x), value=k, out=x)
        bound, s = abs(k) * bound, s / abs(k)
    elif h_floor is None:
        x.copy_(mu)
    else:  # a separate buffer when the momentum is wider than the Hessian (mu_dtype)
        den = x if hess.dtype == x.dtype else scratch.get(1, hess)
        torch.div(mu, torch.clamp(hess, min=h_floor, out=den), out=x)
    if stats is not None:
        stats.append((x.abs() < bound).sum() if bound is not None else torch.tensor(x.numel(), device=x.device))
    if bound is not None:
        if isinstance(bound, torch.Tensor):
            x.clamp_(min=-bound, max=bound)
        else:
            x.clamp_(-bound, bound)
    if k is not None:
        if divisor is not None:  # int8 -> float into a scratch buffer (exact for |mask| <= 127)
            x.div_(divisor if divisor.dtype == x.dtype else scratch.get(1, x).copy_(divisor))
        if stats is not None:  # scaled first: |x| may approach clip / wd
            stats.append((x.float() * s).square().sum())
        p.lerp_(x, lr * wd)
        return
    if wd != 0:
        p.mul_(1 - lr * wd)
    if isinstance(s, torch.Tensor):  # device counter: the scale stays on the device
        x.mul_(s)
        s = 1.0
    if divisor is None:
        if stats is not None:
            stats.append(x.float().square().sum() * s**2)
        p.add_(x, alpha=-lr * s)
        return
    # int8 -> float into a scratch buffer (exact for |mask| <= 127); the division by the mask
    # is folded into the parameter update (addcdiv: one pass over memory less).
    divisor = divisor if divisor.dtype == x.dtype else scratch.get(1, x).copy_(divisor)
    if stats is not None:
        stats.append(torch.div(x, divisor, out=scratch.get(2, x)).float().square().sum() * s**2)
    p.addcdiv_(x, divisor, value=-lr * s)


def check_foreach(flag) -> None:
    """Raise ``ValueError`` unless ``foreach`` is ``None``, ``True`` or ``False``."""
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"Invalid foreach: {flag!r} (expected None, True or False)")


#: On CPU, tensors below this many elements take the multi-tensor ops by default: their step is
#: bound by per-operation dispatch (~4 us an op), which ``torch._foreach_*`` pays once per list.
#: Larger ones take the loop, whose scratch buffers avoid the full-size temporaries (page-faulted
#: on every step) that the out-of-place ``foreach`` ops allocate.
FOREACH_CPU_MAX_NUMEL = 65536


def use_foreach(flag: bool | None, params) -> bool:
    """``foreach`` as given, or by default: multi-tensor kernels when every tensor is on a CUDA device."""
    if flag is not None:
        return flag
    return all(p.is_cuda for p in params)


def foreach_split(flag: bool | None, params) -> list[bool]:
    """Per tensor: take the multi-tensor ops (``True``) or the per-tensor loop (``False``).

    ``True``/``False``: all or none. ``None`` (default): all when every tensor is on CUDA; otherwise
    the small CPU tensors (fewer than :data:`FOREACH_CPU_MAX_NUMEL` elements). Both forms run the
    same operations, so the split changes speed, not results (bit-identical on CPU).
    """
    if use_foreach(flag, params):
        return [True] * len(params)
    if flag is False:
        return [False] * len(params)
    return [p.is_cpu and p.numel() < FOREACH_CPU_MAX_NUMEL for p in params]


def by_device_and_dtype(*lists):
    """Split parallel tensor lists into sub-lists sharing the first list's device and dtype (foreach needs both)."""
    if len({(t.device, t.dtype) for t in lists[0]}) <= 1:  # the common case: one bucket (or none)
        return [[list(part) for part in lists]] if lists[0] else []
    buckets: dict[tuple, list[list]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in lists])
        for out, item in zip(bucket, items):
            out.append(item)
    return list(buckets.values())


def increment_steps(steps: list[torch.Tensor]) -> None:
    """Add 1 to every 0-d step counter, one multi-tensor op per device and dtype."""
    for (part,) in by_device_and_dtype(steps):
        torch._foreach_add_(part, 1.0)


def sophia_g_foreach(params, grads, exp_avgs, hessians, *, lr, wd, beta1, scale, hess_nonneg: bool = False):
    """:func:`sophia_g_eager` for lists of tensors on one device and dtype (multi-tensor ops, same bits on CPU)."""
    k = None if scale < _G_MIN_SCALE else lerp_factor(lr, wd, 1 / scale, scale, params[0], exp_avgs[0])
    if k is None:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if scale < _G_MIN_SCALE:
        denom = torch._foreach_mul(hessians, scale)
        torch._foreach_add_(denom, SOPHIA_G_EPS)
        torch._foreach_clamp_min_(denom, SOPHIA_G_EPS)
        bound, step = 1.0, -lr
    else:
        denom = torch._foreach_add(hessians, SOPHIA_G_EPS / scale)
        if not hess_nonneg:
            torch._foreach_clamp_min_(denom, SOPHIA_G_EPS / scale)
        bound, step = scale, -lr / scale
    if k is None:
        x = torch._foreach_div(exp_avgs, denom)
    else:  # (k * m) / denom, as addcdiv computes it in the per-tensor loop
        x = torch._foreach_mul(exp_avgs, k)
        torch._foreach_div_(x, denom)
        bound = abs(k) * scale
    del denom
    torch._foreach_clamp_min_(x, -bound)
    torch._foreach_clamp_max_(x, bound)
    if k is None:
        torch._foreach_add_(params, x, alpha=step)
    else:
        torch._foreach_lerp_(params, x, lr * wd)


def sophia_h_foreach(params, grads, exp_avgs, hessians, masks, *, bias_corrections, lr, wd, beta1, gamma, eps, clip):
    """:func:`sophia_h_eager` for lists of tensors on one device and dtype (multi-tensor ops).

    The same operations in the same order (bit-identical to the loop on CPU); the momentum must have
    the parameters' dtype. ``bias_corrections`` holds one float (or 0-d tensor) per tensor; tensors
    with the same value share the multi-tensor calls that need a scalar.
    """
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    buckets: dict = {}
    for i, bc in enumerate(bias_corrections):
        buckets.setdefault(bc if not isinstance(bc, torch.Tensor) else id(bc), (bc, []))[1].append(i)
    for bc, idx in buckets.values():
        ps, ms, hs = [params[i] for i in idx], [exp_avgs[i] for i in idx], [hessians[i] for i in idx]
        h_floor, s = sophia_h_scale(bc, gamma, eps)
        bound = None if clip is None else clip / s
        k = lerp_factor(lr, wd, s, bound, ps[0], ms[0])
        spare = None if h_floor is None else torch._foreach_clamp_min(hs, h_floor)
        if k is not None:  # (k * mu) / max(nu, floor), as addcdiv computes it in the per-tensor loop
            x = torch._foreach_mul(ms, k)
            if spare is not None:
                torch._foreach_div_(x, spare)
            bound, s = abs(k) * bound, s / abs(k)
        else:
            x = torch._foreach_mul(ms, 1.0) if spare is None else torch._foreach_div(ms, spare)
        if bound is not None:
            if isinstance(bound, torch.Tensor):  # a device counter: per tensor (no host sync)
                for t in x:
                    t.clamp_(min=-bound, max=bound)
            else:
                torch._foreach_clamp_min_(x, -bound)
                torch._foreach_clamp_max_(x, bound)
        if masks is not None:
            # int8 -> float into spent buffers (exact for |mask| <= 127)
            spare = spare if spare is not None else torch._foreach_mul(ms, 0.0)
            torch._foreach_copy_(spare, [masks[i] for i in idx])
        if k is not None:
            if masks is not None:
                torch._foreach_div_(x, spare)
            torch._foreach_lerp_(ps, x, lr * wd)
            continue
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        if isinstance(s, torch.Tensor):
            torch._foreach_mul_(x, s)
            s = 1.0
        if masks is None:
            torch._foreach_add_(ps, x, alpha=-lr * s)
        else:  # the division by the mask is folded into the update, as in sophia_h_eager
            torch._foreach_addcdiv_(ps, x, spare, value=-lr * s)


# ------------------------------------------------------------------------ compiled kernels
# One compiled call per optimizer step covers every parameter group: ``counts`` (a tuple of ints,
# a compile-time constant) says how many consecutive list entries belong to each group, and ``hp``
# (one small tensor built per step) holds each group's changing hyperparameters, so a schedule
# does not recompile and dynamo evaluates its guards once per step, not once per group. The 0-d
# ``step`` counters are incremented inside the kernel (no per-tensor Python dispatch), and
# Sophia-H's bias correction is computed there from each parameter's own counter (no ``.item()``).
def _sophia_g_multi(params, grads, exp_avgs, hessians, steps, hp, counts, beta1s):
    start = 0
    for gi, n in enumerate(counts):
        lr, wd, scale = hp[gi, 0], hp[gi, 1], hp[gi, 2]
        beta1 = beta1s[gi]
        for j in range(start, start + n):
            p, g, m, h = params[j], grads[j], exp_avgs[j], hessians[j]
            steps[j].add_(1)
            p.mul_(1 - lr * wd)
            m.mul_(beta1).add_(g * (1 - beta1))
            denom = (h * scale).clamp(min=0) + SOPHIA_G_EPS
            p.sub_(lr * (m / denom).clamp(-1, 1))
        start += n


def _sophia_h_multi(params, grads, exp_avgs, hessians, masks, steps, hp, counts, consts):
    """``consts[gi] = (beta1, gamma, eps, clip, damp)``; ``masks`` is ``None`` or FlatSophia's int8 masks.

    The mask holds 1 or the integer ``damp``, so ``u / mask`` equals ``where(mask == 1, u, u / damp)``
    bit for bit. The division is kept: Inductor's AVX2 code loads 8 int8 lanes through a scalar
    ``memcpy`` either way, and the ``where`` form measured 2.4x slower than the division on CPU
    (int8 -> float conversion and one ``vdivps``; see docs/performance.md).
    """
    start = 0
    for gi, n in enumerate(counts):
        lr, wd = hp[gi, 0], hp[gi, 1]
        beta1, gamma, eps, clip, damp = consts[gi]
        for j in range(start, start + n):
            steps[j].add_(1)
        # One small buffer of the group's bias corrections (read by every parameter's loop, so
        # Inductor materialises it once instead of recomputing ``pow`` per vector of elements).
        bias_corrections = torch.stack(
            [(1 - beta1 ** steps[j].to(torch.float64)).to(hp.dtype) for j in range(start, start + n)]
        )
        for j in range(start, start + n):
            p, g, m, h = params[j], grads[j], exp_avgs[j], hessians[j]
            m.mul_(beta1).add_(g * (1 - beta1))
            u = (m / bias_corrections[j - start]) / (h * gamma).clamp(min=eps)
            if clip is not None:
                u = u.clamp(-clip, clip)
            if masks is not None:
                u = u / masks[j]
            p.sub_(lr * (u + wd * p))
        start += n


# The same two kernels written with multi-tensor ops, for CUDA: Inductor lowers each chain of
# ``_foreach_*`` ops into a few horizontally fused (combo) kernels covering all tensors, where the
# per-tensor form above becomes one kernel launch per tensor (the CPU backend has no launches to
# save, and the per-tensor form measured faster there).
def _sophia_g_multi_foreach(params, grads, exp_avgs, hessians, steps, hp, counts, beta1s):
    torch._foreach_add_(steps, 1)
    start = 0
    for gi, n in enumerate(counts):
        lr, wd, scale = hp[gi, 0], hp[gi, 1], hp[gi, 2]
        beta1 = beta1s[gi]
        ps, gs, ms, hs = (x[start : start + n] for x in (params, grads, exp_avgs, hessians))
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - beta1))
        denom = torch._foreach_mul(hs, scale)
        torch._foreach_clamp_min_(denom, 0.0)
        torch._foreach_add_(denom, SOPHIA_G_EPS)
        ratio = torch._foreach_div(ms, denom)
        torch._foreach_clamp_min_(ratio, -1.0)
        torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_sub_(ps, torch._foreach_mul(ratio, lr))
        start += n


def _sophia_h_multi_foreach(params, grads, exp_avgs, hessians, masks, steps, hp, counts, consts):
    torch._foreach_add_(steps, 1)
    start = 0
    for gi, n in enumerate(counts):
        lr, wd = hp[gi, 0], hp[gi, 1]
        beta1, gamma, eps, clip, damp = consts[gi]
        ps, gs, ms, hs = (x[start : start + n] for x in (params, grads, exp_avgs, hessians))
        # 1 - beta1 ** t per tensor, from its own counter (a list of 0-d tensors on its device).
        bias_corrections = torch._foreach_pow(beta1, torch._foreach_mul(steps[start : start + n], 1.0))
        torch._foreach_neg_(bias_corrections)
        torch._foreach_add_(bias_corrections, 1.0)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, torch._foreach_mul(gs, 1 - beta1))
        u = torch._foreach_div(ms, bias_corrections)
        denom = torch._foreach_mul(hs, gamma)
        torch._foreach_clamp_min_(denom, eps)
        torch._foreach_div_(u, denom)
        if clip is not None:
            torch._foreach_clamp_min_(u, -clip)
            torch._foreach_clamp_max_(u, clip)
        if masks is not None:
            torch._foreach_div_(u, masks[start : start + n])
        torch._foreach_add_(u, torch._foreach_mul(ps, wd))
        torch._foreach_sub_(ps, torch._foreach_mul(u, lr))
        start += n


#: Accepted values of the optimizers' ``compile`` argument.
COMPILE_MODES = (False, True, "reduce-overhead")


def check_compile(value) -> bool | str:
    """``compile`` as given if it is one of :data:`COMPILE_MODES`; ``ValueError`` naming it otherwise."""
    if value is False or value is True or value == "reduce-overhead":
        return value
    raise ValueError(f"Invalid compile: {value!r} (expected False, True or 'reduce-overhead')")


class CompiledKernel:
    """A lazily ``torch.compile``d kernel that remembers (and logs once) why it cannot be used.

    ``cuda_fn`` (optional) is the form compiled for CUDA tensors (multi-tensor ops); ``fn`` serves
    every other device. Each form is compiled on first use. With ``mode="reduce-overhead"`` the
    CUDA form also runs as a CUDA graph: one launch per step instead of one per fused kernel. The
    tensors in ``static`` (parameters and optimizer state, updated in place) are marked as static
    inputs; the others (gradients, hyperparameters) are copied into the graph's own buffers on
    every replay, which costs one extra gradient-sized buffer on the device.
    """

    def __init__(self, fn, cuda_fn=None):
        self.fn = fn
        self.cuda_fn = cuda_fn
        self._compiled: dict[tuple, object] = {}
        self._failures: dict[tuple, str] = {}  # per form: a CUDA-graph failure leaves ``compile=True`` usable
        self._static: dict[int, weakref.ref] = {}  # tensors already marked static, by id

    @property
    def failure(self) -> str | None:
        """Why compilation failed (the first failure of any form), or ``None``."""
        return next(iter(self._failures.values()), None)

    def __call__(self, *args, mode: str | None = None, static=()) -> bool:
        """Run the compiled kernel; ``False`` (nothing changed) if compilation is unavailable.

        The first argument is the list of parameters; its first tensor's device picks the form.
        """
        cuda = self.cuda_fn is not None and bool(args[0]) and args[0][0].is_cuda
        graphs = cuda and mode == "reduce-overhead"
        key = (cuda, graphs)
        if key in self._failures:
            return False
        try:
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = torch.compile(
                    self.cuda_fn if cuda else self.fn, fullgraph=True, mode="reduce-overhead" if graphs else None
                )
                self._compiled[key] = compiled
            if graphs:
                self._mark_static(static)
            compiled(*args)
            return True
        except Exception as err:  # compilation can fail in many ways (no compiler, unsupported op)
            self._failures[key] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning(
                "torch.compile of the optimizer step is unavailable (%s); using the eager step", self._failures[key]
            )
            return False

    def _mark_static(self, static) -> None:
        """Mark new parameter/state tensors (first step, a resume) as static CUDA-graph inputs, once each."""
        for tensors in static:
            for t in tensors:
                ref = self._static.get(id(t))
                if ref is None or ref() is not t:
                    torch._dynamo.mark_static_address(t)
                    self._static[id(t)] = weakref.ref(t)


SOPHIA_G_COMPILED = CompiledKernel(_sophia_g_multi, _sophia_g_multi_foreach)
SOPHIA_H_COMPILED = CompiledKernel(_sophia_h_multi, _sophia_h_multi_foreach)


def scalar_dtype(like: torch.Tensor) -> torch.dtype:
    """dtype of the changing scalars handed to a compiled kernel: float64 for float64 parameters."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def one_scalar_dtype(params: list[torch.Tensor]) -> bool:
    """Whether all ``params`` share one :func:`scalar_dtype` (one hyperparameter tensor serves them all)."""
    dtypes = {p.dtype for p in params}  # a set first: one Python call per distinct dtype, not per tensor
    return len({torch.float64 if d == torch.float64 else torch.float32 for d in dtypes}) <= 1


def hyper_tensor(rows: list[list[float]], like: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
    """Per-group hyperparameters as one ``(groups, k)`` tensor on ``like``'s device.

    With ``cache`` (a dict the optimizer keeps), the tensor of the previous call is reused while the
    values, dtype and device are unchanged: no host-to-device copy on steps without a schedule change.
    """
    dtype = scalar_dtype(like)
    key = (like.device, dtype)
    if cache is not None and cache.get("key") == key and cache.get("rows") == rows:
        return cache["tensor"]
    t = torch.tensor(rows, dtype=dtype)
    if like.is_cuda:  # through pinned memory, asynchronously: no host-device sync on a schedule change
        t = t.pin_memory().to(like.device, non_blocking=True)
    else:
        t = t.to(like.device)
    if cache is not None:
        cache.update(key=key, rows=[list(r) for r in rows], tensor=t)
    return t


def step_counter_on(state: dict, p: torch.Tensor) -> torch.Tensor:
    """``state["step"]``, moved once to ``p``'s device (compiled kernels count there: no host sync)."""
    step_t = state["step"]
    if not (step_t.is_cpu and p.is_cpu) and step_t.device != p.device:  # is_cpu: the cheap common check
        step_t = state["step"] = step_t.to(p.device)
    return step_t
