"""Step kernels of the Sophia family: eager (scratch buffers) and ``torch.compile``d (fused).

Eager kernels write their temporaries into two scratch buffers sized for the largest parameter
instead of allocating fresh tensors every step: on CPU a large fresh allocation is page-faulted and
zeroed by the kernel, which costs about as much as the arithmetic.

Compiled kernels take every hyperparameter that changes between steps (learning rate, bias
correction, ``rho * bs``) as a 0-d tensor, so a schedule does not trigger recompilation; Inductor
fuses each parameter's update into one pass over memory. They are opt-in (``compile=True``) and
fall back to the eager kernels, with the reason logged once, wherever compilation fails.
"""

from __future__ import annotations

import logging

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

    def clear(self) -> None:
        self._buffers.clear()


# --------------------------------------------------------------------------- eager kernels
def sophia_g_eager(p, grad, exp_avg, hess, *, lr, wd, beta1, scale, scratch: Scratch):
    """One Sophia-G update of one tensor, bit-identical to the authors' arithmetic.

    ``clamp(m / d, -1, 1)`` equals ``sign(m) * min(|m| / d, 1)`` exactly for ``d > 0``, and
    ``max(s*h + eps, eps)`` equals ``max(s*h, 0) + eps`` (the reference's ``s*h + eps`` for h >= 0).
    Returns the clipped direction (a scratch view) for diagnostics.
    """
    p.mul_(1 - lr * wd)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    denom = torch.mul(hess, scale, out=scratch.get(0, p)).add_(SOPHIA_G_EPS).clamp_(min=SOPHIA_G_EPS)
    ratio = torch.div(exp_avg, denom, out=scratch.get(1, p)).clamp_(-1, 1)
    p.add_(ratio, alpha=-lr)
    return ratio


def sophia_h_direction(mu, hess, *, bias_correction, gamma, eps, scratch: Scratch, like):
    """``mu_hat / max(gamma * nu, eps)`` (unclipped) as a scratch view shaped like ``like``."""
    u = torch.div(mu, bias_correction, out=scratch.get(0, like))
    denom = torch.mul(hess, gamma, out=scratch.get(1, like)).clamp_(min=eps)
    return u.div_(denom)


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


class CompiledKernel:
    """A lazily ``torch.compile``d kernel that remembers (and logs once) why it cannot be used."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        self.failure: str | None = None

    def __call__(self, *args) -> bool:
        """Run the compiled kernel; ``False`` (nothing changed) if compilation is unavailable."""
        if self.failure is not None:
            return False
        try:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, fullgraph=True)
            self._compiled(*args)
            return True
        except Exception as err:  # compilation can fail in many ways (no compiler, unsupported op)
            self.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            log.warning("torch.compile of the optimizer step is unavailable (%s); using the eager step", self.failure)
            return False


SOPHIA_G_COMPILED = CompiledKernel(_sophia_g_multi)
SOPHIA_H_COMPILED = CompiledKernel(_sophia_h_multi)


def scalar_dtype(like: torch.Tensor) -> torch.dtype:
    """dtype of the changing scalars handed to a compiled kernel: float64 for float64 parameters."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def hyper_tensor(rows: list[list[float]], like: torch.Tensor) -> torch.Tensor:
    """Per-group hyperparameters as one ``(groups, k)`` tensor on ``like``'s device (one copy per step)."""
    return torch.tensor(rows, dtype=scalar_dtype(like), device=like.device)


def step_counter_on(state: dict, p: torch.Tensor) -> torch.Tensor:
    """``state["step"]``, moved once to ``p``'s device (compiled kernels count there: no host sync)."""
    step_t = state["step"]
    if step_t.device != p.device:
        step_t = state["step"] = step_t.to(p.device)
    return step_t
