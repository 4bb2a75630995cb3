"""HessianRefresher.backward, the loop's one call: bit for bit the multi-call loop of the
lower-level methods (every optimizer, every hvp form, accumulation, a GradScaler, bf16 autocast),
its step count (from optimizer hooks, resumed from either state dict), the mistakes it refuses, and
DDP on 2 gloo ranks against one process over the concatenated batch."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _spawn import spawn
from flatsophia.hessian import HessianRefresher
from flatsophia.optim import FlatSophia, SophiaG, SophiaH

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 7  # refreshes at steps 0, 3 and 6 with every_k=3
#: Settings where most updates are not clipped (tests/modules/_helpers.py UNCLIPPED), so the
#: estimates reach the parameters: the tests check the unclipped fraction at every step.
OPTS = {
    "sophia_g": (SophiaG, dict(lr=1e-2, rho=500, bs=8)),
    "sophia_h": (SophiaH, dict(lr=1e-2, gamma=1000, eps=0.1)),
    "flat_sophia": (FlatSophia, dict(lr=1e-2, gamma=1000, eps=0.1, sharp_fraction=0.2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2)),
}


def _net(dtype=torch.float32, dropout=0.1):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Dropout(dropout), nn.Linear(9, 3)).to(dtype)


def _data(dtype=torch.float32, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 8, 6, generator=g, dtype=torch.float64).to(dtype)
    return x, (x[..., 0] + x[..., 1] > 0).long() + (x[..., 2] > 0.5).long()


def _setup(name, hvp="auto", dtype=torch.float32, scaler=None, dropout=0.1, **kwargs):
    model = _net(dtype, dropout)
    cls, opts = OPTS[name]
    opt = cls(model.parameters(), **opts)
    if name != "adamw":  # a first-order optimizer: warned that a schedule does not apply
        kwargs.setdefault("every_k", 3)
    refresher = HessianRefresher(opt, model=model, seed=5, hvp=hvp, scaler=scaler, **kwargs)
    return model, opt, refresher


def _step(opt, scaler=None):
    kwargs = {"collect_stats": True} if hasattr(opt, "stats") else {}
    if scaler is not None:
        scaler.step(opt, **kwargs)
        scaler.update()
    else:
        opt.step(**kwargs)
    opt.zero_grad(set_to_none=True)
    return opt.stats()["win_rate"].item() if kwargs else 1.0


def _micro_batches(x, y, accumulate):
    return list(zip(x.chunk(accumulate), y.chunk(accumulate)))


def backward_loop(model, opt, refresher, steps=range(STEPS), accumulate=1, scaler=None, autocast=None):
    """The six-line loop (with accumulation: ``loss_divisor``); returns the unclipped fractions."""
    xs, ys = _data(next(model.parameters()).dtype)
    wins = []
    for step in steps:
        for x, y in _micro_batches(xs[step], ys[step], accumulate):
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                refresher.backward(x, y, F.cross_entropy, loss_divisor=accumulate)
        wins.append(_step(opt, scaler))
    return wins


def multi_call_loop(model, opt, refresher, steps=range(STEPS), accumulate=1, scaler=None, autocast=None):
    """The loop of the lower-level methods, written out: the refresh on each step's first micro-batch."""
    xs, ys = _data(next(model.parameters()).dtype)
    for step in steps:
        for i, (x, y) in enumerate(_micro_batches(xs[step], ys[step], accumulate)):
            forward, loss_fn = (lambda x=x: model(x)), (lambda out, y=y: F.cross_entropy(out, y))
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                if i > 0:
                    loss = loss_fn(forward())
                    ((scaler.scale(loss) if scaler else loss) / accumulate).backward()
                elif refresher.shares_forward(step):
                    _, estimates = refresher.forward_backward(forward, loss_fn, loss_divisor=accumulate)
                    refresher.maybe_refresh(step, forward, loss_fn, estimates)
                else:
                    with refresher.training_pass(step, accumulate):
                        loss = loss_fn(forward())
                        ((scaler.scale(loss) if scaler else loss) / accumulate).backward()
                    refresher.maybe_refresh(step, forward, loss_fn)
        _step(opt, scaler)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b)))


#: (optimizer, hvp, accumulated micro-batches, refresh_prob)
CASES = [
    ("sophia_h", "auto", 1, None),  # full precision: the finite difference, reusing the training gradient
    ("sophia_h", "finite_difference", 2, None),
    ("sophia_h", "autograd", 1, None),  # shares the training forward
    ("sophia_h", "autograd", 2, 0.4),  # shared forward refused by the random schedule: a fresh forward
    ("flat_sophia", "auto", 2, None),
    ("sophia_g", "auto", 1, None),  # GNB, sharing the forward
    ("sophia_g", "auto", 4, 0.4),
    ("adamw", "auto", 2, None),  # first-order: the plain backward
]


@pytest.mark.parametrize(("name", "hvp", "accumulate", "prob"), CASES, ids=lambda v: str(v))
def test_backward_equals_the_multi_call_loop(name, hvp, accumulate, prob):
    kwargs = {"refresh_prob": prob} if prob else {}
    model, opt, refresher = _setup(name, hvp, **kwargs)
    wins = backward_loop(model, opt, refresher, accumulate=accumulate)
    ref_model, ref_opt, ref_refresher = _setup(name, hvp, **kwargs)
    multi_call_loop(ref_model, ref_opt, ref_refresher, accumulate=accumulate)
    _assert_same(model, ref_model)
    assert (refresher.refreshes, refresher.skipped) == (ref_refresher.refreshes, ref_refresher.skipped)
    if name != "adamw":
        assert refresher.refreshes == (3 if prob is None else ref_refresher.refreshes) and refresher.refreshes >= 2
        assert min(wins) > 0.5, f"unclipped fraction {min(wins):.2f}: the estimates barely reach the update"
        assert getattr(refresher.estimator, "hvp", None) == getattr(ref_refresher.estimator, "hvp", None)
    assert refresher.state_dict()["optimizer_steps"] == STEPS


def test_refresh_only_on_the_first_micro_batch_and_due_steps():
    """Refreshes at steps 0, 3, 6 of 7, once each whatever the micro-batches: the step index is the
    optimizer's step count."""
    model, opt, refresher = _setup("sophia_h", "autograd")
    calls = []
    apply = refresher.apply
    refresher.apply = lambda est: calls.append(refresher._steps) or apply(est)
    backward_loop(model, opt, refresher, accumulate=4)
    assert calls == [0, 3, 6] and refresher.refreshes == 3


def test_grad_scaler_and_bf16_autocast():
    """With scaler= backward scales the loss itself (scaler.step/update unscale): the multi-call
    loop's parameters, bit for bit. Under bf16 autocast hvp="auto" follows the pass's precision and
    picks the double backward."""
    runs = []
    for loop in (backward_loop, multi_call_loop):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        model, opt, refresher = _setup("flat_sophia", scaler=scaler)
        loop(model, opt, refresher, accumulate=2, scaler=scaler)
        assert refresher.estimator.hvp == "finite_difference" and refresher.refreshes == 3
        runs.append(model)
    _assert_same(*runs)
    runs = []
    for loop in (backward_loop, multi_call_loop):
        model, opt, refresher = _setup("sophia_h", "auto", dropout=0.0)
        assert refresher.estimator.hvp == "finite_difference"  # full precision at construction
        loop(model, opt, refresher, autocast=torch.bfloat16)
        assert refresher.estimator.hvp == "autograd" and refresher.refreshes == 3
        runs.append(model)
    _assert_same(*runs)


def test_resume_counts_steps_from_either_state_dict():
    """4 steps, checkpoint, 3 steps == 7 straight, bit for bit: the step count comes from the
    refresher's state, and from an older refresher state without it, from the optimizer's own."""
    straight = _setup("flat_sophia", dropout=0.0)
    backward_loop(*straight)
    first = _setup("flat_sophia", dropout=0.0)
    backward_loop(*first, steps=range(4))
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "ref": first[2].state_dict()}, buf)
    for old in (False, True):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        assert ckpt["ref"]["optimizer_steps"] == 4
        if old:
            del ckpt["ref"]["optimizer_steps"]
        model, opt, refresher = _setup("flat_sophia", dropout=0.0)
        model.load_state_dict(ckpt["model"])
        refresher.load_state_dict(ckpt["ref"])
        opt.load_state_dict(ckpt["opt"])
        backward_loop(model, opt, refresher, steps=range(4, STEPS))
        assert refresher.refreshes == straight[2].refreshes == 3 and refresher._steps == STEPS
        _assert_same(model, straight[0])


def test_mistakes_are_refused():
    model, opt, refresher = _setup("sophia_h")
    x, y = _data()
    # a step with no backward since the previous one, on a due step: refused before anything changes
    refresher.backward(x[0], y[0], F.cross_entropy)
    _step(opt)
    refresher.backward(x[1], y[1], F.cross_entropy)
    _step(opt)
    refresher.backward(x[2], y[2], F.cross_entropy)
    _step(opt)
    before = _params(model)
    (F.cross_entropy(model(x[3]), y[3])).backward()  # loss.backward() on step 3, whose refresh is due
    with pytest.raises(RuntimeError, match="step 3, whose Hessian refresh is due.*refresher.backward"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, _params(model))) and refresher._steps == 3
    refresher.backward(x[3], y[3], F.cross_entropy)
    opt.step()
    assert refresher.refreshes == 2 and refresher._steps == 4
    # bad arguments
    with pytest.raises(ValueError, match="Invalid loss_divisor: 0"):
        refresher.backward(x[0], y[0], F.cross_entropy, loss_divisor=0)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        refresher.backward(x[0], y[0], lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="backward needs model="):
        HessianRefresher(SophiaH(model.parameters()), hvp="autograd").backward(x[0], y[0], F.cross_entropy)
    with pytest.raises(ValueError, match="does not hold the optimizer's parameters"):
        HessianRefresher(SophiaH(model.parameters()), model=_net()).backward(x[0], y[0], F.cross_entropy)
    # with a scaler, optimizer.step() on scaled gradients
    scaler = torch.amp.GradScaler("cpu")
    model, opt, refresher = _setup("sophia_h", scaler=scaler)
    refresher.backward(x[0], y[0], F.cross_entropy)
    with pytest.raises(RuntimeError, match=r"scaler.step\(optimizer\)"):
        opt.step()
    scaler.step(opt)
    scaler.update()
    assert refresher._steps == 1


# ------------------------------------------------------------------ DDP on 2 gloo ranks
F64 = torch.float64
DDP_CASES = [("sophia_g", 1), ("sophia_h", 1), ("flat_sophia", 2)]


def _ddp_run(name, rows, accumulate, ddp: bool, shard: bool = False):
    """Float64, no dropout; ``rows`` of each global batch of 8 (rank r: 4r .. 4r + 3; ``None``: all)."""
    model = _net(F64, dropout=0.0)
    if ddp:
        trained = nn.parallel.DistributedDataParallel(model)
    elif shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0], mesh=init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
        trained = fully_shard(model)
    else:
        trained = model
    cls, opts = OPTS[name]
    opt = cls(model.parameters(), **opts)
    refresher = HessianRefresher(opt, model=trained, every_k=3, seed=5)
    calls = []  # forwards through the wrapper: the training passes only (refreshes use model.module)
    trained.register_forward_pre_hook(lambda *_: calls.append(1))
    xs, ys = _data(F64)
    wins = []
    for step in range(STEPS):
        if rows is None:  # one process: micro-batch i holds the ranks' i-th micro-batches, in rank order
            halves = [_micro_batches(xs[step, r], ys[step, r], accumulate) for r in (slice(0, 4), slice(4, 8))]
            micro = [tuple(torch.cat(t) for t in zip(*pair)) for pair in zip(*halves)]
        else:
            micro = _micro_batches(xs[step, rows], ys[step, rows], accumulate)
        for x, y in micro:
            refresher.backward(x, y, F.cross_entropy, loss_divisor=accumulate)
        wins.append(_step(opt))

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return {
        "params": [full(p) for p in model.parameters()],
        "refreshes": refresher.refreshes,
        "reduce": getattr(refresher.reduce, "__name__", None),
        "hvp": getattr(refresher.estimator, "hvp", None),
        "wins": min(wins),
        "wrapper_forwards": len(calls),
    }


def _ddp_worker(rank, world):
    rows = slice(4 * rank, 4 * rank + 4)
    out = {case: _ddp_run(*case[:1], rows, case[1], ddp=True) for case in DDP_CASES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out["fsdp"] = _ddp_run("sophia_h", rows, 1, ddp=False, shard=True)
    # the unwrapped model on 2 ranks: nothing would be averaged
    model = _net(F64, dropout=0.0)
    refresher = HessianRefresher(SophiaH(model.parameters()), model=model)
    try:
        refresher.backward(*(t[0, rows] for t in _data(F64)), F.cross_entropy)
    except ValueError as err:
        out["unwrapped"] = str(err)
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_ddp_worker)


def test_an_unwrapped_model_on_two_ranks_is_refused(ranks):
    for out in ranks:
        assert "on 2 ranks with a model that is neither DistributedDataParallel" in out["unwrapped"]


@pytest.mark.parametrize("case", DDP_CASES + ["fsdp"], ids=str)
def test_ddp_and_fsdp2_equal_one_process_over_the_global_batch(ranks, case):
    """refresher.backward on the DDP-wrapped model (reduce defaults to distributed_mean; the refresh
    forwards use model.module) or the fully_shard-ed one (reduce=None): the ranks stay identical,
    and equal one process over the concatenated batch to the rounding of a mean over ranks, which
    the finite difference (Sophia-H, FlatSophia: hvp="auto" in float64) amplifies by 1/eps: there
    the bound of tests/modules/test_distributed.py, 1e-8 (measured ~1e-9)."""
    name, accumulate = ("sophia_h", 1) if case == "fsdp" else case
    single = _ddp_run(name, None, accumulate, ddp=False)
    for out in ranks:
        run = out[case]
        assert run["reduce"] == (None if case == "fsdp" else "distributed_mean")
        assert run["refreshes"] == single["refreshes"] == 3 and run["hvp"] == single["hvp"]
        assert run["wins"] > 0.5
        if case != "fsdp":
            assert run["wrapper_forwards"] == STEPS * accumulate
        assert all(torch.equal(p, q) for p, q in zip(run["params"], ranks[0][case]["params"]))
        diff = max((p - s).abs().max().item() for p, s in zip(run["params"], single["params"]))
        print(f"{case}: max |param diff| vs one process {diff:.3g}, unclipped >= {run['wins']:.2f}")
        assert diff < (1e-8 if run["hvp"] == "finite_difference" else 1e-12), f"{case}: max |param diff| {diff:.3g}"


def subset_loop(model, opt, refresher, accumulate=1):
    """The lower-level loop at ``batch_fraction < 1`` as docs/library.md's backward runs it: the
    training pass whole, the refresh on the first rows of the step's first micro-batch."""
    xs, ys = _data(next(model.parameters()).dtype)
    wins = []
    for step in range(STEPS):
        for i, (x, y) in enumerate(_micro_batches(xs[step], ys[step], accumulate)):
            with refresher.training_pass(step, accumulate) if i == 0 else contextlib.nullcontext():
                (F.cross_entropy(model(x), y) / accumulate).backward()
            if i == 0:
                sx, sy = refresher.subset((x, y))
                share = len(sy) / len(y)
                refresher.maybe_refresh(
                    step, lambda sx=sx: model(sx), lambda o, sy=sy: F.cross_entropy(o, sy), share=share
                )
        wins.append(_step(opt))
    return wins


FRACTION_CASES = [
    ("sophia_h", "finite_difference", 1),  # both of the subset's gradients taken by the refresh
    ("sophia_h", "autograd", 2),
    ("flat_sophia", "auto", 1),
    ("sophia_g", "auto", 2),  # GNB: scaled by the subset's share of the rows
]


@pytest.mark.parametrize(("name", "hvp", "accumulate"), FRACTION_CASES, ids=lambda v: str(v))
def test_backward_at_a_batch_fraction_equals_the_loop_on_the_subset(name, hvp, accumulate):
    model, opt, refresher = _setup(name, hvp, batch_fraction=0.25)
    wins = backward_loop(model, opt, refresher, accumulate=accumulate)
    ref_model, ref_opt, ref_refresher = _setup(name, hvp, batch_fraction=0.25)
    subset_loop(ref_model, ref_opt, ref_refresher, accumulate=accumulate)
    _assert_same(model, ref_model)
    assert refresher.refreshes == ref_refresher.refreshes == 3 and min(wins) > 0.5
    whole_model, whole_opt, whole = _setup(name, hvp)  # the whole batch's estimates: another run
    backward_loop(whole_model, whole_opt, whole, accumulate=accumulate)
    assert not all(torch.equal(p, q) for p, q in zip(_params(model), _params(whole_model)))
