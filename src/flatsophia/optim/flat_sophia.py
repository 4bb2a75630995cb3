"""FlatSophia: Sophia-H with an int8 sharpness mask that damps the sharpest coordinates.

Reference code: github.com/evanatyourservice/flat-sophia (``flat_sophia.py``, ``scale_by_sophia_h``
with ``project_to_flat=True``; JAX/optax, MIT). Idea source: Wang et al. 2024, "Improving
generalization and convergence by enhancing implicit regularization", arXiv:2405.20763.
This is an independent PyTorch implementation of the reference's semantics.
"""

from __future__ import annotations

import math

import torch

from ._common import check_nonneg
from .sophia_h import SophiaH

__all__ = ["FlatSophia", "MASK_SOURCES"]

#: Where the sharpness mask comes from: the fresh estimate (reference), the Hessian EMA, or a
#: random draw of the same size (a control: is it *which* coordinates are damped, or damping at all?).
MASK_SOURCES = ("estimate", "ema", "random")


class FlatSophia(SophiaH):
    r"""Sophia-H whose update is divided by an int8 sharpness mask.

    On every Hessian refresh (:meth:`update_hessian` with :math:`d = v \odot Hv`), besides the
    Sophia-H EMA update, the mask is rebuilt from the *fresh* estimate :math:`d` (not the EMA):

    .. math::
        \tau = \text{the } k\text{-th largest } |d| \text{ over all parameters of the optimizer},
        \quad k = \lfloor \text{sharp\_fraction} \cdot n \rfloor, \qquad
        \text{mask} = \begin{cases} \text{dampening\_factor} & |d| > \tau \\ 1 & \text{else}\end{cases}

    and every step divides the clipped direction by the mask:
    :math:`\theta \leftarrow \theta - \eta\,(u / \text{mask} + \lambda\theta)`. The mask starts at
    1 and keeps its value between refreshes. Memory: two buffers in the parameter's dtype plus
    one int8 buffer per parameter.

    Args:
        sharp_fraction: fraction of coordinates (globally, across all groups) to damp, in [0, 1]
            (default 0.2, as in the reference README and experiment). ``0`` keeps no mask at all
            and is exactly :class:`~flatsophia.optim.SophiaH`.
        dampening_factor: integer divisor of the damped coordinates' update, in [1, 127]
            (default 10). ``1`` is exactly Sophia-H.
        mask_source: ``"estimate"`` (default, the reference: the fresh estimate :math:`d`),
            ``"ema"`` (the Hessian EMA after the update; a lower-variance variant for ablations) or
            ``"random"`` (a control: the same number of coordinates, chosen uniformly at random at
            each refresh from a generator seeded by ``mask_seed`` and the step count).
        mask_seed: seed of the ``"random"`` mask.
        Other arguments: see :class:`~flatsophia.optim.SophiaH`.

    The threshold and the comparison follow the reference exactly: :math:`\tau` is the
    :math:`k`-th largest :math:`|d|` itself and the comparison is strict, so the coordinate holding
    :math:`\tau` is not damped: with distinct values exactly :math:`k - 1` coordinates are masked
    (``masked_frac`` in :meth:`stats` is :math:`(k-1)/n`), and fewer when values tie at
    :math:`\tau`. With ``k <= 1`` (tiny models or tiny ``sharp_fraction``) nothing is masked.
    """

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        gamma: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 1e-4,
        clip_threshold: float | None = 1.0,
        sharp_fraction: float = 0.2,
        dampening_factor: int = 10,
        *,
        mask_source: str = "estimate",
        mask_seed: int = 0,
        mu_dtype: torch.dtype | str | None = None,
        compile: bool | str = False,
        fused: bool = False,
        foreach: bool | None = None,
    ):
        check_nonneg("sharp_fraction", sharp_fraction)
        if sharp_fraction > 1:
            raise ValueError(f"Invalid sharp_fraction: {sharp_fraction!r} (expected a number in [0, 1])")
        if (
            isinstance(dampening_factor, bool)
            or not isinstance(dampening_factor, (int, float))
            or not (float(dampening_factor).is_integer() and 1 <= dampening_factor <= 127)
        ):
            raise ValueError(
                f"Invalid dampening_factor: {dampening_factor!r} (expected an integer in [1, 127]; "
                "the mask is stored as int8)"
            )
        if mask_source not in MASK_SOURCES:
            raise ValueError(f"Invalid mask_source: {mask_source!r} (expected one of {', '.join(MASK_SOURCES)})")
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            gamma=gamma,
            eps=eps,
            weight_decay=weight_decay,
            clip_threshold=clip_threshold,
            mu_dtype=mu_dtype,
            compile=compile,
            fused=fused,
            foreach=foreach,
        )
        # Optimizer-wide settings: the mask's threshold is global across all groups.
        self.defaults.update(sharp_fraction=sharp_fraction, dampening_factor=int(dampening_factor))
        self.defaults["mask_source"] = mask_source
        self.defaults["mask_seed"] = int(mask_seed)

    @property
    def _masking(self) -> bool:
        return self.defaults["sharp_fraction"] > 0 and self.defaults["dampening_factor"] != 1

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = super()._init_state(p, group)
        if "mask" not in state and self._masking:
            state["mask"] = torch.ones_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
        return state

    def _direction_divisor(self, state: dict) -> torch.Tensor | None:
        return state.get("mask") if self._masking else None

    def _mask_damp(self) -> int | None:
        return self.defaults["dampening_factor"] if self._masking else None

    @torch.no_grad()
    def _after_hessian_update(self, pairs, groups) -> None:
        if not self._masking or not pairs:
            return
        source = self.defaults["mask_source"]
        if source == "ema":
            sources = [(p, self.state[p]["hessian"]) for p, _ in pairs]
        elif source == "random":
            # Seeded by the step count, so the draw needs no extra state and resumes exactly.
            step = int(self.state[pairs[0][0]]["step"].item())
            g = torch.Generator().manual_seed(self.defaults["mask_seed"] * 1_000_003 + step)
            sources = [(p, torch.rand(p.shape, generator=g).to(p.device)) for p, _ in pairs]
        else:
            sources = pairs
        n_total = sum(e.numel() for _, e in sources)
        k = int(self.defaults["sharp_fraction"] * n_total)
        damp = self.defaults["dampening_factor"]
        if k == 0:
            for p, _ in sources:
                self.state[p]["mask"].fill_(1)
            return
        dtype = torch.float32
        for _, e in sources:
            dtype = torch.promote_types(dtype, e.dtype)
        flat = torch.cat([e.detach().reshape(-1).to(dtype) for _, e in sources]).abs_()
        tau = kth_largest(flat, k)
        # One compare over everything; bool is stored as bytes 0/1, so 1 + (damp - 1) * sharp is
        # the int8 mask in one cheap integer pass per tensor (no where / float temporaries).
        sharp = torch.gt(flat, tau).view(torch.int8)
        one = torch.ones((), dtype=torch.int8, device=flat.device)
        offset = 0
        for p, e in sources:
            n = e.numel()
            part = sharp[offset : offset + n].view(e.shape)
            offset += n
            mask = self.state[p]["mask"]
            if mask.is_contiguous() and mask.device == flat.device:
                torch.add(one, part, alpha=damp - 1, out=mask)
            else:
                mask.copy_(torch.add(one, part, alpha=damp - 1))

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Sophia-H's diagnostics plus ``masked_frac``, the fraction of coordinates being damped."""
        out = super().stats()
        masks = [s["mask"] for s in self.state.values() if "mask" in s]
        if masks:
            n = sum(m.numel() for m in masks)
            out["masked_frac"] = sum((m != 1).sum() for m in masks).float() / n
        return out


#: Below this many values :func:`kth_largest` calls ``torch.kthvalue`` directly.
KTH_DIRECT_BELOW = 1 << 18
#: Size of the strided subsample that brackets the threshold.
KTH_SAMPLE = 1 << 14


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of the 1-d tensor ``flat`` (0-d tensor), exactly as
    ``torch.kthvalue(flat, flat.numel() - k + 1).values``, but in a few passes over memory.

    ``kthvalue`` over millions of values is a selection with random access (65 ms for 5.4M floats
    on 2 CPU cores). Here a strided subsample of :data:`KTH_SAMPLE` values gives two bracket
    values ``lo <= hi`` around the ``k / n`` quantile, with a margin of 4 binomial standard
    deviations plus 2 ranks; two counting passes check that the true ``k``-th largest lies in
    ``[lo, hi]`` (fewer than ``k`` values above ``hi``, at least ``k`` values at or above ``lo``),
    and ``kthvalue`` then runs only on the few values inside the bracket, at rank ``k`` minus the
    count above ``hi``. If the bracket misses (an adversarially ordered input), it falls back to
    ``kthvalue`` over everything, so the result is always exact. ``flat`` must not hold NaN.
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"kth_largest: k={k} out of range for {n} values")
    if n < KTH_DIRECT_BELOW:
        return torch.kthvalue(flat, n - k + 1).values
    stride = n // KTH_SAMPLE
    sample = flat[::stride]
    s = sample.numel()
    q = k / n
    margin = 4.0 * math.sqrt(s * q * (1.0 - q)) + 2.0
    k_hi = max(1, math.floor(q * s - margin))  # fewer from the top: a value at or above the k-th largest
    k_lo = min(s, math.ceil(q * s + margin))  # more from the top: a value at or below it
    hi = torch.kthvalue(sample, s - k_hi + 1).values
    lo = torch.kthvalue(sample, s - k_lo + 1).values
    above = torch.gt(flat, hi)
    n_above = int(torch.count_nonzero(above))
    inside = torch.ge(flat, lo).logical_and_(above.logical_not_())
    n_inside = int(torch.count_nonzero(inside))
    if not n_above < k <= n_above + n_inside:
        return torch.kthvalue(flat, n - k + 1).values
    candidates = flat[inside]
    return torch.kthvalue(candidates, n_inside - (k - n_above) + 1).values
