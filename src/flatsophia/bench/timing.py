"""How the benchmark measures: interleaved rounds, paired ratios, a confidence interval of the median.

Every candidate of a section is timed once per round, in an order rotated from round to round, so a
slow drift of the machine (another job, clocks) hits all candidates alike. ``Timer`` is
``torch.utils.benchmark.Timer``, which also synchronises CUDA. A candidate's ratio to the section's
reference is taken round by round (its round median over the reference's in the same round); the
median of those per-round ratios is reported with a distribution-free confidence interval
(:func:`median_ci`).
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable

import torch
from torch.utils.benchmark import Timer

__all__ = [
    "measure",
    "summarize",
    "median_ci",
    "round_ratios",
    "add_ratios",
    "count_flops",
    "peak_memory",
]


def measure(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    threads: int,
    *,
    number: int | dict[str, int | None] | None = None,
    min_run_time: float = 1.0,
    log: Callable[[str], None] = print,
    label: str = "",
) -> dict[str, dict]:
    """Time every candidate in ``rounds`` rotated rounds; returns ``{name: summarize(...)}``.

    ``number`` (for all candidates, or per name): ``None`` takes ``Timer.blocked_autorange(min_run_time)``
    (its samples are per-call means of blocks); ``n`` takes ``Timer.timeit(number=n)``, one sample per
    round, the mean of ``n`` consecutive calls after the Timer's own two warm-up calls.
    """
    names = list(candidates)
    per_name = number if isinstance(number, dict) else dict.fromkeys(names, number)
    timers = {
        n: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label, sub_label=n)
        for n, fn in candidates.items()
    }
    times: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for n in names[shift:] + names[:shift]:
            if per_name.get(n) is None:
                m = timers[n].blocked_autorange(min_run_time=min_run_time)
            else:
                m = timers[n].timeit(number=per_name[n])
            times[n].extend(m.times)
            medians[n].append(statistics.median(m.times))
        log(f"  [{label}] round {r + 1}/{rounds}")
    return {n: summarize(times[n], medians[n]) for n in names}


def summarize(times_s: list[float], round_medians_s: list[float]) -> dict:
    """Median / min / max / IQR (ms) over all samples, and the per-round medians (ms)."""
    ts = sorted(times_s)
    if not ts:
        return dict(median_ms=None, min_ms=None, max_ms=None, iqr_ms=None, n=0, round_medians_ms=[])
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return dict(
        median_ms=statistics.median(ts) * 1e3,
        min_ms=ts[0] * 1e3,
        max_ms=ts[-1] * 1e3,
        iqr_ms=(q[2] - q[0]) * 1e3,
        n=len(ts),
        round_medians_ms=[t * 1e3 for t in round_medians_s],
    )


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free confidence interval of the median: ``(lo, hi, coverage)``.

    With the values sorted, ``[v[j], v[n-1-j]]`` covers the population median with probability
    ``1 - 2 * P(Binomial(n, 1/2) <= j)``; ``j`` is the largest rank for which that is at least
    ``level`` (the coverage returned is that exact probability, >= ``level``). ``None`` when even
    ``[min, max]`` falls short of ``level`` (fewer than 6 values at 95 %).
    """
    n = len(values)
    if n == 0:
        return None
    v = sorted(values)
    tail, j = 0.0, -1  # tail = P(B <= j)
    while True:
        nxt = tail + math.comb(n, j + 1) / 2**n
        if 1 - 2 * nxt < level:
            break
        tail, j = nxt, j + 1
    if j < 0:
        return None
    return v[j], v[n - 1 - j], 1 - 2 * tail


def round_ratios(row: dict, reference: dict) -> list[float]:
    """``row``'s median over ``reference``'s median, round by round (both timed in the same rounds)."""
    a, b = row.get("round_medians_ms") or [], reference.get("round_medians_ms") or []
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


def add_ratios(rows: dict[str, dict], reference: str, level: float = 0.95) -> None:
    """Give every timed row of a section its ratio to the ``reference`` row, in place.

    ``ratio``: the ratio of the overall medians; ``paired``: the median of the per-round ratios
    (:func:`round_ratios`); ``ci``: :func:`median_ci` of those, ``[lo, hi, coverage]`` or ``None``.
    """
    base = rows.get(reference) or {}
    for row in rows.values():
        if row.get("median_ms") is None or base.get("median_ms") is None:
            continue
        ratios = round_ratios(row, base)
        ci = median_ci(ratios, level)
        row["ratio"] = row["median_ms"] / base["median_ms"]
        row["paired"] = statistics.median(ratios) if ratios else None
        row["ci"] = None if ci is None else list(ci)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter.FlopCounterMode`` counts them
    (matrix products, convolutions, attention; element-wise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory that one call of ``fn`` allocates above the level at its start.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the maximum running sum of the allocator's
    allocation and free events during the call (``torch.profiler`` with ``profile_memory=True``);
    frees of tensors that existed before the call are not subtracted, and it is not the process RSS.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    current = peak = 0
    for _, size in sorted(events):
        current += size
        peak = max(peak, current)
    return int(peak)
