"""The benchmark's sections; each returns ``{"reference": row key or None, "rows": {key: row}, ...}``.

* ``iteration``: a training iteration (forward, backward, Hessian refresh when due, step,
  ``zero_grad``) amortised over ``k`` iterations with one refresh, run through
  :class:`~flatsophia.hessian.HessianRefresher`'s lower-level loop as docs/library.md shows it
  (:func:`training_step`; ``refresher.backward`` runs the same calls, bit for bit); one sample =
  ``k`` consecutive iterations, which always hold exactly one refresh. Hutchinson optimizers get
  one row per ``hvp`` form. Every second-order optimizer gets
  one more row per ``--batch-fractions`` value below 1 (the refresh on the first ``ceil(f * B)``
  examples: a fresh forward on them, or for the finite difference the training pass split in two
  chunks, the subset first). The authors' SophiaG runs the authors' loop (a sampled-label
  forward+backward and ``update_hessian()`` every ``k`` steps).
* ``refresh``: the gradient work of one refresh step without the optimizer step (the training
  gradient, the estimate and ``update_hessian``, as the loop does it on a refresh step), against a
  plain forward+backward (``fwd_bwd``); with the matrix-product FLOPs of each, counted once, and the
  floor they put under the iteration ratio at ``k``: ``1 + (flops / fwd_bwd flops - 1) / k``.
* ``step``: ``optimizer.step()`` alone on fixed gradients, per kernel (``foreach=False``: single,
  ``True``: multi), and ``torch.compile(opt.step)`` with ``--compile``. An optimizer with a
  ``precondition_frequency`` (SOAP) is timed as the mean of that many steps (one eigenbasis refresh).
* ``state``: optimizer state bytes per parameter, excluding the 0-d step counters and including them.
* ``memory``: peak tensor memory allocated by one refresh step, next to a forward+backward.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.hessian import HessianRefresher
from flatsophia.hessian.hutchinson import HVP_MODES

from .timing import add_ratios, count_flops, measure, peak_memory
from .workloads import REFERENCE, Unavailable, Workload, hessian_of, kernels, label, make_optimizer

__all__ = ["Context", "SECTIONS", "training_step", "authors_training_step", "state_bytes"]


@dataclass
class Context:
    """What every section needs: the workload on its device, and how long to measure."""

    workload: Workload
    device: torch.device
    optimizers: list[str]
    threads: int = 1
    rounds: int = 12
    min_run_time: float = 1.0
    k: int = 10
    seed: int = 0
    compile: bool = False
    fractions: tuple[float, ...] = (1,)
    log: Callable[[str], None] = print
    keep: list = field(default_factory=list)  # keeps the timed models and optimizers alive


# ---------------------------------------------------------------------------- the loops


def training_step(
    opt, refresher: HessianRefresher, forward, loss_fn, step: int, take_step: bool = True, chunks=None
) -> None:
    """One iteration of :class:`~flatsophia.hessian.HessianRefresher`'s lower-level loop
    (docs/library.md), ``step`` being the optimizer step's index; ``take_step=False`` stops before
    ``opt.step()`` (the refresh section). ``chunks``: at ``batch_fraction < 1``, ``(subset, rest,
    share)`` from :meth:`Workload.chunks <flatsophia.bench.workloads.Workload.chunks>`: the refresh
    runs on the subset's closures, and a step the refresher :meth:`splits
    <flatsophia.hessian.HessianRefresher.splits>` runs its training pass as the two chunks."""
    estimates = None
    if refresher.shares_forward(step):  # one forward for the gradient and the estimate
        loss, estimates = refresher.forward_backward(forward, loss_fn)
    elif chunks is not None and refresher.splits(step):  # the subset's gradient for the finite difference
        (sub_forward, sub_loss), (rest_forward, rest_loss), share = chunks
        with refresher.training_pass(step, loss_divisor=1 / share, subset=True):
            (sub_loss(sub_forward()) / (1 / share)).backward()
        (rest_loss(rest_forward()) * (1 - share)).backward()
    else:
        with refresher.training_pass(step):  # records the gradient for hvp="finite_difference"
            loss = loss_fn(forward())
            loss.backward()
    share = None
    if chunks is not None:
        (forward, loss_fn), _, share = chunks
    refresher.maybe_refresh(step, forward, loss_fn, estimates, share=share)
    if take_step:
        opt.step()
    opt.zero_grad()


def authors_refresh(opt, forward) -> None:
    """The authors' Hessian refresh (their ``train_sophiag.py``): labels sampled from the logits,
    the sampled-label loss back-propagated into ``.grad``, then ``update_hessian()``."""
    logits = forward()
    sampled = torch.distributions.Categorical(logits=logits).sample()
    F.cross_entropy(logits, sampled).backward()
    opt.update_hessian()
    opt.zero_grad(set_to_none=True)


def authors_training_step(opt, forward, loss_fn, step: int, k: int, predictions: int) -> None:
    """One iteration of the authors' loop: forward, backward, ``step(bs=...)``, and after every
    ``k``-th step a refresh on its own forward."""
    loss_fn(forward()).backward()
    opt.step(bs=predictions)
    opt.zero_grad(set_to_none=True)
    if step % k == k - 1:
        authors_refresh(opt, forward)


def hvp_forms(name: str) -> tuple[str | None, ...]:
    """One row per Hessian-vector-product form for a Hutchinson optimizer, else one row."""
    return HVP_MODES if hessian_of(name) == "hutchinson" else (None,)


def refresher_for(
    ctx: Context, name: str, model: nn.Module, opt, hvp: str | None, fraction: float = 1
) -> HessianRefresher:
    if hessian_of(name) == "none":
        return HessianRefresher(opt, model=model)  # a no-op for a first-order optimizer
    kwargs = {"hvp": hvp} if hvp else {}
    return HessianRefresher(opt, model=model, every_k=ctx.k, seed=ctx.seed, batch_fraction=fraction, **kwargs)


def chunks_for(ctx: Context, refresher: HessianRefresher, model: nn.Module):
    """The workload's ``(subset, rest, share)`` closures for ``refresher``'s ``batch_fraction`` (``None`` at 1)."""
    if refresher.batch_fraction == 1:
        return None
    return ctx.workload.chunks(model, refresher.subset_size(ctx.workload.inputs.shape[0]))


def candidate(ctx: Context, name: str, kernel: str | None = None, *, primed: bool = False, grads: bool = False):
    """A copy of the workload's model with optimizer ``name``: ``(model, opt, forward, loss_fn)``.

    ``primed``: one Hessian refresh first (a second-order optimizer's step then sees a real
    estimate); ``grads``: ``.grad`` holds the gradient of the fixed batch (the step section).
    """
    model = copy.deepcopy(ctx.workload.model)
    opt = make_optimizer(name, model, ctx.workload.predictions, kernel)
    forward, loss_fn = ctx.workload.closures(model)
    if primed and hessian_of(name) == "authors":
        authors_refresh(opt, forward)
    elif primed and hessian_of(name) != "none":
        refresher_for(ctx, name, model, opt, None).refresh(forward, loss_fn)
    opt.zero_grad(set_to_none=True)
    if grads:
        loss_fn(forward()).backward()
    return model, opt, forward, loss_fn


def _row_key(name: str, variant: str | None, fraction: float = 1) -> str:
    key = name if variant is None else f"{name}/{variant}"
    return key if fraction == 1 else f"{key}/f={fraction:g}"


def _refresh_note(name: str, hvp: str | None, refresher: HessianRefresher | None, every: int | None = None) -> str:
    kind = hessian_of(name)
    when = f" every {every} steps" if every else ""
    if kind == "authors":
        return f"authors' loop: sampled-label forward+backward and update_hessian(){when}"
    if kind == "none":
        return "no Hessian refresh"
    what = "Gauss-Newton-Bartlett" if kind == "gnb" else f"Hutchinson, hvp={hvp}"
    shares = "sharing the training forward" if refresher.shares_forward(0) else "reusing the training gradient"
    if refresher.batch_fraction < 1:
        how = "a fresh forward"
        if refresher.finite_difference:
            split = refresher.splits(0)
            how = "the training pass split, reusing the subset's gradient" if split else "both gradients in the refresh"
        shares = f"on the first {100 * refresher.batch_fraction:g}% of the batch: {how}"
    return f"{what}{when}, {shares}"


# ---------------------------------------------------------------------------- sections


def _candidates(ctx: Context, rows: dict, names: list[str]):
    """For each of ``names``, each of its HVP forms and each batch fraction (below 1 only for the
    refresher's estimators): add its row to ``rows`` and yield ``(name, hvp, fraction, row,
    candidate(...))``, keeping the model and optimizer alive; a candidate that cannot be built here
    leaves its row ``skipped`` with the reason."""
    for name in names:
        fractions = ctx.fractions if hessian_of(name) in ("gnb", "hutchinson") else (1,)
        for hvp in hvp_forms(name):
            for fraction in fractions:
                row = rows[_row_key(name, hvp, fraction)] = dict(optimizer=label(name), hvp=hvp, status="ok")
                if fraction != 1:
                    row["batch_fraction"] = fraction
                try:
                    built = candidate(ctx, name)
                except Unavailable as e:
                    row.update(status="skipped", note=str(e))
                    continue
                ctx.keep.append(built[:2])
                yield name, hvp, fraction, row, built


def run_iteration(ctx: Context) -> dict:
    ctx.log(f"== iteration: one refresh per {ctx.k} iterations (HessianRefresher's plain loop)")
    rows, cands = {}, {}
    for name, hvp, fraction, row, (model, opt, forward, loss_fn) in _candidates(ctx, rows, ctx.optimizers):
        counter = itertools.count()
        if hessian_of(name) == "authors":
            preds = ctx.workload.predictions

            def fn(opt=opt, forward=forward, loss_fn=loss_fn, counter=counter, preds=preds):
                authors_training_step(opt, forward, loss_fn, next(counter), ctx.k, preds)

            row["note"] = _refresh_note(name, hvp, None, ctx.k)
        else:
            refresher = refresher_for(ctx, name, model, opt, hvp, fraction)
            chunks = chunks_for(ctx, refresher, model)

            def fn(opt=opt, refresher=refresher, forward=forward, loss_fn=loss_fn, counter=counter, chunks=chunks):
                training_step(opt, refresher, forward, loss_fn, next(counter), chunks=chunks)

            row["note"] = _refresh_note(name, hvp, refresher, ctx.k)
            if freq := opt.defaults.get("precondition_frequency"):
                row["note"] = f"eigenbasis refresh inside step() every {freq} steps"
        for _ in range(2):
            fn()
        cands[_row_key(name, hvp, fraction)] = fn
    for key, stats in measure(cands, ctx.rounds, ctx.threads, number=ctx.k, log=ctx.log, label="iteration").items():
        rows[key].update(stats)
    add_ratios(rows, REFERENCE)
    ctx.keep.clear()
    return {"reference": REFERENCE, "k": ctx.k, "unit": "ms per iteration", "rows": rows}


def _refresh_candidates(ctx: Context) -> tuple[dict[str, dict], dict[str, Callable[[], None]]]:
    """The refresh steps (see the module docstring) and the plain forward+backward ``fwd_bwd``."""
    model, opt, forward, loss_fn = candidate(ctx, REFERENCE)

    def fwd_bwd(opt=opt, forward=forward, loss_fn=loss_fn):
        opt.zero_grad()
        loss_fn(forward()).backward()

    rows = {"fwd_bwd": dict(optimizer="forward+backward", hvp=None, status="ok", note="the unit: no refresh")}
    fns = {"fwd_bwd": fwd_bwd}
    ctx.keep.append((model, opt))
    second_order = [name for name in ctx.optimizers if hessian_of(name) != "none"]
    for name, hvp, fraction, row, (model, opt, forward, loss_fn) in _candidates(ctx, rows, second_order):
        if hessian_of(name) == "authors":

            def fn(opt=opt, forward=forward, loss_fn=loss_fn):
                opt.zero_grad(set_to_none=True)
                loss_fn(forward()).backward()  # the training gradient, consumed by the step
                opt.zero_grad(set_to_none=True)
                authors_refresh(opt, forward)

            row["note"] = "training forward+backward, then the authors' refresh on its own forward"
        else:
            refresher = refresher_for(ctx, name, model, opt, hvp, fraction)
            chunks = chunks_for(ctx, refresher, model)

            def fn(opt=opt, refresher=refresher, forward=forward, loss_fn=loss_fn, chunks=chunks):
                training_step(opt, refresher, forward, loss_fn, 0, take_step=False, chunks=chunks)

            row["note"] = _refresh_note(name, hvp, refresher)
        fns[_row_key(name, hvp, fraction)] = fn
    return rows, fns


def run_refresh(ctx: Context) -> dict:
    ctx.log("== refresh: one refresh step's gradient work, against a forward+backward")
    rows, fns = _refresh_candidates(ctx)
    for key, fn in fns.items():
        fn()  # warm-up
        rows[key]["gflop"] = count_flops(fn) / 1e9
    timed = measure(fns, ctx.rounds, ctx.threads, min_run_time=ctx.min_run_time, log=ctx.log, label="refresh")
    for key, stats in timed.items():
        rows[key].update(stats)
    add_ratios(rows, "fwd_bwd")
    unit = rows["fwd_bwd"]["gflop"]
    for row in rows.values():
        if row.get("gflop") is not None and unit:
            row["flop_ratio"] = row["gflop"] / unit
            row["iteration_floor"] = 1 + (row["flop_ratio"] - 1) / ctx.k
    ctx.keep.clear()
    return {"reference": "fwd_bwd", "k": ctx.k, "unit": "ms per refresh step", "rows": rows}


def run_memory(ctx: Context) -> dict:
    ctx.log("== memory: peak tensor memory of one refresh step")
    rows, fns = _refresh_candidates(ctx)
    for key, fn in fns.items():
        fn()
        peak = peak_memory(fn, ctx.device)
        rows[key].update(peak_mib=peak / 2**20, peak_bytes_per_param=peak / ctx.workload.n_params)
    base = rows["fwd_bwd"]["peak_mib"]
    for row in rows.values():
        if row.get("peak_mib") is not None and base:
            row["ratio"] = row["peak_mib"] / base
    ctx.keep.clear()
    method = (
        "torch.cuda.max_memory_allocated above the level at the start of the call"
        if ctx.device.type == "cuda"
        else "torch.profiler allocation events: peak running sum of bytes allocated by the call and not yet freed"
    )
    return {"reference": "fwd_bwd", "method": method, "rows": rows}


def run_step(ctx: Context) -> dict:
    ctx.log("== step: optimizer.step() alone on fixed gradients")
    rows, cands, number = {}, {}, {}
    for name in ctx.optimizers:
        variants = list(kernels(name))
        if ctx.compile and variants != [None]:
            variants.append("compiled")
        for variant in variants:
            key = _row_key(name, variant)
            row = rows[key] = dict(optimizer=label(name), kernel=variant or "default", status="ok")
            try:
                model, opt, _, _ = candidate(
                    ctx, name, None if variant == "compiled" else variant, primed=True, grads=True
                )
            except Unavailable as e:
                row.update(status="skipped", note=str(e))
                continue
            fn = step_function(name, opt, ctx.workload.predictions)
            if variant == "compiled":
                try:
                    fn = torch.compile(fn)
                    t0 = time.perf_counter()
                    fn()
                    row["compile_s"] = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - a compile failure is a result, reported in the row
                    row.update(
                        status="failed",
                        note=f"torch.compile(opt.step) failed: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}",
                    )
                    continue
                row["note"] = "torch.compile(opt.step), default kernel"
            freq = opt.defaults.get("precondition_frequency")
            if freq:
                number[key] = int(freq)
                row["note"] = f"one sample = the mean of {freq} steps (one eigenbasis refresh)"
            for _ in range(3):
                fn()
            cands[key] = fn
            ctx.keep.append((model, opt))
    timed = measure(
        cands, ctx.rounds, ctx.threads, number=number, min_run_time=ctx.min_run_time, log=ctx.log, label="step"
    )
    for key, stats in timed.items():
        rows[key].update(stats)
    add_ratios(rows, REFERENCE)
    ctx.keep.clear()
    return {"reference": REFERENCE, "unit": "ms per step", "rows": rows}


def step_function(name: str, opt, predictions: int) -> Callable[[], object]:
    if hessian_of(name) == "authors":
        return lambda: opt.step(bs=predictions)
    return opt.step


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """``(bytes of tensors with at least one dimension, bytes of all tensors)`` in ``opt.state``."""
    seen: set[int] = set()
    shaped = total = 0

    def visit(v):
        nonlocal shaped, total
        if isinstance(v, torch.Tensor):
            if id(v) in seen:
                return
            seen.add(id(v))
            total += v.numel() * v.element_size()
            shaped += v.numel() * v.element_size() if v.dim() > 0 else 0
        elif isinstance(v, dict):
            for w in v.values():
                visit(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                visit(w)

    for s in opt.state.values():
        visit(s)
    return shaped, total


def run_state(ctx: Context) -> dict:
    ctx.log("== state: optimizer state bytes per parameter")
    rows = {}
    n = ctx.workload.n_params
    for name in ctx.optimizers:
        row = rows[name] = dict(optimizer=label(name), status="ok")
        try:
            _, opt, _, _ = candidate(ctx, name, primed=True, grads=True)
        except Unavailable as e:
            row.update(status="skipped", note=str(e))
            continue
        fn = step_function(name, opt, ctx.workload.predictions)
        fn()
        fn()
        shaped, total = state_bytes(opt)
        row.update(
            bytes=shaped, bytes_with_counters=total, bytes_per_param=shaped / n, bytes_per_param_with_counters=total / n
        )
    return {"reference": None, "unit": "bytes per parameter", "rows": rows}


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "iteration": run_iteration,
    "refresh": run_refresh,
    "step": run_step,
    "state": run_state,
    "memory": run_memory,
}
