"""FlatSophia: Sophia-H with an int8 sharpness mask that damps the sharpest coordinates.

Reference code: github.com/evanatyourservice/flat-sophia (``flat_sophia.py``, ``scale_by_sophia_h``
with ``project_to_flat=True``; JAX/optax, MIT). Idea source: Wang et al. 2024, "Improving
generalization and convergence by enhancing implicit regularization", arXiv:2405.20763.
An independent PyTorch implementation of the reference's semantics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from flatsophia.sharding import all_reduce_sum, local, local_shard, shard_group, wrap_like

from ._base import _global_sums, _SophiaBase
from ._common import check_choice, check_int, check_nonneg
from .sophia_h import SophiaH

__all__ = [
    "FlatSophia",
    "MASK_SOURCES",
    "build_masks",
    "distributed_kth_largest",
    "kth_largest",
]

#: Where the sharpness mask comes from: the fresh estimate (reference), the Hessian EMA, or a
#: random draw of the same size (a control: is it *which* coordinates are damped, or damping at all?).
MASK_SOURCES = ("estimate", "ema", "random")

#: Options of the mask, one value for all groups (the threshold is global).
MASK_OPTIONS = ("sharp_fraction", "dampening_factor", "mask_source", "mask_seed")


class FlatSophia(SophiaH):
    r"""Sophia-H whose update is divided by an int8 sharpness mask.

    On every Hessian refresh (:meth:`update_hessian` with :math:`d = v \odot Hv`), besides the
    Sophia-H EMA update, ``mask`` is rebuilt from the *fresh* estimate :math:`d` (not the EMA):

    .. math::
        \tau = \text{the } k\text{-th largest } |d| \text{ over all parameters of the optimizer},
        \quad k = \lfloor \text{sharp\_fraction} \cdot n \rfloor, \qquad
        \text{mask} = \begin{cases} \text{dampening\_factor} & |d| > \tau \\ 1 & \text{else}\end{cases}

    and every step divides the clipped direction by it:
    :math:`\theta \leftarrow \theta - \mathrm{lr}\,(u / \text{mask} + \lambda\theta)`, with :math:`u` as in
    :class:`~flatsophia.optim.SophiaH`. The mask starts at 1 and keeps its value between refreshes.
    Memory: two buffers (in the parameter's dtype, float32 for bf16/fp16 parameters; see
    ``mu_dtype`` and ``hessian_dtype``) plus one int8 buffer per parameter.

    Args:
        sharp_fraction: fraction of coordinates (all groups together) to damp, in [0, 1]
            (default 0.2, as in the reference README and experiment). ``0`` keeps no mask at all
            and is exactly :class:`~flatsophia.optim.SophiaH`.
        dampening_factor: integer divisor of the damped coordinates' update, in [1, 127]
            (default 10). ``1`` is exactly Sophia-H.
        mask_source: ``"estimate"`` (default, the reference: the fresh estimate :math:`d`),
            ``"ema"`` (the Hessian EMA after the update; a lower-variance variant for ablations) or
            ``"random"`` (a control: the same number of coordinates, chosen uniformly at random at
            each refresh from a generator seeded by ``mask_seed`` and the step count).
        mask_seed: seed of the ``"random"`` mask (default 0).
        Other arguments: see :class:`~flatsophia.optim.SophiaH`.

    The four mask options are parameter-group options that must agree across groups (the
    threshold is global); a group with another value raises ``ValueError``.
    As in the reference, :math:`\tau` is the :math:`k`-th largest :math:`|d|` itself and the
    comparison is strict, so with distinct values exactly :math:`k - 1` coordinates are masked
    (``masked_frac`` in :meth:`stats` is :math:`(k-1)/n`), fewer when values tie at :math:`\tau`,
    none with ``k <= 1``.

    In a training loop, :class:`~flatsophia.hessian.HessianRefresher` takes the Hutchinson estimates
    and calls :meth:`update_hessian` (every 10th step by default; docs/library.md)::

        opt = FlatSophia(model.parameters(), lr=1e-3)
        refresher = HessianRefresher(opt, model=model)
        for x, y in loader:
            loss = refresher.backward(x, y, F.cross_entropy)
            opt.step()
            opt.zero_grad()

    Reference code: https://github.com/evanatyourservice/flat-sophia (``project_to_flat=True``).
    Idea: https://arxiv.org/abs/2405.20763.
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
            sharp_fraction=sharp_fraction,
            dampening_factor=dampening_factor,
            mask_source=mask_source,
            mask_seed=mask_seed,
        )
        _SophiaBase.__init__(self, params, defaults)  # SophiaH's options plus the mask's

    def _check_options(self, options: dict) -> None:
        super()._check_options(options)
        sharp_fraction, damp = options["sharp_fraction"], options["dampening_factor"]
        check_nonneg("sharp_fraction", sharp_fraction)
        if sharp_fraction > 1:
            raise ValueError(f"Invalid sharp_fraction: {sharp_fraction!r} (expected a number in [0, 1])")
        if (
            isinstance(damp, bool)
            or not isinstance(damp, (int, float))
            or not (float(damp).is_integer() and 1 <= damp <= 127)
        ):
            raise ValueError(
                f"Invalid dampening_factor: {damp!r} (expected an integer in [1, 127]; the mask is stored as int8)"
            )
        options["dampening_factor"] = int(damp)
        check_choice("mask_source", options["mask_source"], MASK_SOURCES)
        check_int("mask_seed", options["mask_seed"], 0)
        groups = getattr(self, "param_groups", None)
        if groups:  # an added group: the mask is global, its options must agree with the first group's
            for key in MASK_OPTIONS:
                if options[key] != groups[0][key]:
                    raise ValueError(
                        f"Invalid {key}: {options[key]!r} in a parameter group; FlatSophia's mask is "
                        f"global, so every group must use the first group's {groups[0][key]!r}"
                    )

    def _masking(self, group: dict) -> bool:
        return group["sharp_fraction"] > 0 and group["dampening_factor"] != 1

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = super()._init_state(p, group)
        if "mask" not in state and self._masking(group):
            state["mask"] = torch.ones_like(p, dtype=torch.int8, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def _after_hessian_update(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        options = self.param_groups[0]
        if not pairs or not self._masking(options):
            return
        source = options["mask_source"]
        if source == "ema":
            sources = [self.state[p]["hessian"] for p, _ in pairs]
        elif source == "random":
            # Seeded by the step count, so the draw needs no extra state and resumes exactly.
            step = int(self.state[pairs[0][0]]["step"].item())
            g = torch.Generator().manual_seed(options["mask_seed"] * 1_000_003 + step)
            # Sharded parameters: the full draw on every rank, this rank's shard kept (as one process).
            sources = [wrap_like(local_shard(torch.rand(p.shape, generator=g).to(p.device), p), p) for p, _ in pairs]
        else:
            sources = [e for _, e in pairs]
        masks = [self.state[p]["mask"] for p, _ in pairs]
        build_masks(masks, sources, options["sharp_fraction"], options["dampening_factor"])

    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Sophia-H's diagnostics plus ``masked_frac``, the fraction of coordinates being damped."""
        out = super().stats()
        masks = [s["mask"] for s in self.state.values() if "mask" in s]
        if masks:
            n = sum(m.numel() for m in masks)  # global counts for DTensors
            masked = sum((local(m) != 1).sum() for m in masks)
            groups = shard_group(masks)
            if groups:
                (masked,) = _global_sums([masked], groups)
            out["masked_frac"] = masked.float() / n
        return out


@torch.no_grad()
def build_masks(
    masks: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], sharp_fraction: float, dampening_factor: int
) -> None:
    """Write ``dampening_factor`` where ``|source| > tau`` and 1 elsewhere into each int8 mask, with
    ``tau`` the ``k``-th largest of all ``|sources|`` together, ``k = int(sharp_fraction * n)`` (nothing
    is damped for ``k = 0``).

    Sharded: when the sources are DTensors (FSDP2 parameters), ``n`` is the global count and ``tau``
    the ``k``-th largest over all ranks' values, found by :func:`distributed_kth_largest` (4
    all-reduces of 256 counts in float32, no gather); each rank writes only its own masks.
    """
    groups = shard_group(list(sources) + list(masks))
    k = int(sharp_fraction * sum(s.numel() for s in sources))  # a DTensor's numel is the global one
    masks, sources = [local(m) for m in masks], [local(s) for s in sources]
    dtype = torch.float32
    for s in sources:
        dtype = torch.promote_types(dtype, s.dtype)
    flat = torch.cat([s.detach().reshape(-1).to(dtype) for s in sources]).abs_()
    if not k:
        tau = None
    elif groups is None:
        tau = kth_largest(flat, k)
    else:
        tau = distributed_kth_largest(flat, k, groups)
    offset = 0
    for mask, s in zip(masks, sources):
        if tau is None:
            mask.fill_(1)
            continue
        part = flat[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
        mask.fill_(1).masked_fill_(part > tau, dampening_factor)


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


#: Bits of the float's bit pattern resolved per all-reduce by :func:`distributed_kth_largest`.
RADIX_BITS = 8
_BIT_VIEWS = {torch.float32: (torch.int32, 31, 0x7F800000), torch.float64: (torch.int64, 63, 0x7FF0000000000000)}


@torch.no_grad()
def distributed_kth_largest(flat: torch.Tensor, k: int, group=None, *, radix_bits: int = RADIX_BITS) -> torch.Tensor:
    """The ``k``-th largest value of the concatenation over ranks of each rank's 1-d ``flat``, exactly
    (``torch.kthvalue`` on the concatenation), without gathering the values. torch.distributed only.

    ``flat`` holds non-negative float32 or float64 values (``|estimate|``; ``-0.0`` counts as
    negative), no NaN; ranks may hold different numbers of values, none included. ``group``: a
    process group, or a list of them to sum over in turn (as
    :func:`flatsophia.sharding.shard_group` returns); ``None``: the default group.

    **Method: a radix select on the bit pattern.** Non-negative IEEE floats order like their bit
    patterns read as integers (31 significant bits in float32, 63 in float64), so the ``k``-th largest
    value is found digit by digit, ``radix_bits`` bits at a time from the top: each round every rank
    counts its candidates (values whose higher digits match the ones found so far) per value of the
    next digit (a histogram of ``2**radix_bits`` counts), one all-reduce sums the histograms, and
    every rank picks the same digit, the one whose bucket holds the ``k``-th largest from the top,
    then keeps only its candidates in that bucket. With the default 8 bits: 4 all-reduces of 256
    int64 counts for float32 (8 for float64); ``radix_bits=1`` is a plain bisection (31 all-reduces
    of one count, plus one carrying the checks). Local work: one pass over ``flat`` and passes over
    the shrinking candidates; each round waits for its all-reduce (a host sync). Measured on 2 gloo
    ranks, one thread each (shared CPU): 5.4M float32 values in all, ~66 ms (bisection ~670 ms;
    :func:`kth_largest` over all of them on one process 53 ms); 1M, ~15 ms; the all-reduces
    themselves ~0.2 ms each.

    Returns:
        a 0-d tensor of ``flat``'s dtype and device, the same on every rank.

    Raises:
        ValueError: on every rank alike, if ``k`` is not in ``[1, n]`` (``n`` the total count) or a
        value is negative or NaN.
    """
    if flat.dtype not in _BIT_VIEWS:
        raise ValueError(f"distributed_kth_largest: float32 or float64 values expected, got {flat.dtype}")
    if not isinstance(radix_bits, int) or not 1 <= radix_bits <= 16:
        raise ValueError(f"Invalid radix_bits: {radix_bits!r} (expected an integer in [1, 16])")
    groups = group if isinstance(group, (list, tuple)) else [group]
    int_dtype, total_bits, inf_bits = _BIT_VIEWS[flat.dtype]
    cand = flat.detach().reshape(-1).contiguous().view(int_dtype)
    device = flat.device
    prefix, remaining, hi, first = 0, int(k), total_bits, True
    while hi > 0:
        lo = max(0, hi - radix_bits)
        width = hi - lo
        if first:  # the top digit; negative, NaN or above-inf values flagged in one more slot
            lowest, highest = torch.aminmax(cand) if cand.numel() else (0, 0)
            bad = int(lowest < 0 or highest > inf_bits)
            digits = cand >> lo
            if bad:  # raised below, on every rank; keep bincount's input in range until then
                digits = digits.clamp(0, (1 << width) - 1)
            hist = torch.bincount(digits, minlength=1 << width)
            hist = torch.cat([hist, hist.new_tensor([bad])])
        else:
            digits = (cand >> lo) & ((1 << width) - 1)
            hist = torch.bincount(digits, minlength=1 << width)
        all_reduce_sum(hist, groups)
        if first:
            if int(hist[-1]):
                raise ValueError("distributed_kth_largest: the values must be non-negative and not NaN")
            hist = hist[:-1]
            n = int(hist.sum())
            if not 1 <= remaining <= n:
                raise ValueError(f"distributed_kth_largest: k={k} out of range for {n} values")
            first = False
        from_top = hist.flip(0).cumsum(0)  # from_top[j]: values whose digit is >= top - j
        j = int(torch.searchsorted(from_top, torch.tensor([remaining], device=device)))
        digit = (1 << width) - 1 - j
        remaining -= int(from_top[j]) - int(hist[digit])  # values in higher buckets
        prefix = (prefix << width) | digit
        cand = cand[digits == digit]
        hi = lo
    return torch.tensor(prefix, dtype=int_dtype, device=device).view(flat.dtype)
