"""HessianRefresher in plain PyTorch loops: the estimator policy, the schedules, the shared forward,
the reduce hook, checkpoints (weights_only) and equality with a hand-written loop."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.hessian import GaussNewtonBartlett, HessianRefresher, Hutchinson, distributed_mean
from flatsophia.optim import OPTIMIZERS, SophiaG, SophiaH, get_spec

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 12


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(n: int = STEPS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()))
    return out


def _loss(out, y):
    return F.cross_entropy(out, y)


def _refresher_loop(model, opt, refresher, batches, start: int = 0, share: bool = True):
    """The loop of the refresher's docstring; returns the steps that refreshed."""
    refreshed = []
    for step, (x, y) in enumerate(batches, start):
        forward, loss_fn = (lambda x=x: model(x)), (lambda out, y=y: _loss(out, y))
        estimates = None
        if share and refresher.shares_forward(step):
            _, estimates = refresher.forward_backward(forward, loss_fn)
        else:
            loss_fn(forward()).backward()
        if refresher.maybe_refresh(step, forward, loss_fn, estimates):
            refreshed.append(step)
        opt.step(**({"bs": 8} if isinstance(opt, SophiaG) else {}))
        opt.zero_grad(set_to_none=True)
    return refreshed


@pytest.mark.parametrize("refresh_prob", [None, 0.3])
def test_equals_a_hand_written_loop(refresh_prob):
    """Fresh-forward refreshes through the refresher are the estimator called by hand, bit for bit."""
    batches = _batches()
    model = _model()
    opt = SophiaH(model.parameters(), lr=1e-2)
    refresher = HessianRefresher(opt, model=model, every_k=3, refresh_prob=refresh_prob, seed=4, hvp="autograd")
    got = _refresher_loop(model, opt, refresher, batches, share=False)

    ref_model = _model()
    ref_opt = SophiaH(ref_model.parameters(), lr=1e-2)
    est = Hutchinson(seed=4)
    rng = torch.Generator().manual_seed(5)  # seed + 1
    want = []
    for step, (x, y) in enumerate(batches):
        _loss(ref_model(x), y).backward()
        draw = torch.rand((), generator=rng).item() if refresh_prob else None
        if (step % 3 == 0) if refresh_prob is None else (step == 0 or draw < refresh_prob):
            want.append(step)
            assert ref_opt.update_hessian(
                est(lambda x=x: ref_model(x), lambda out, y=y: _loss(out, y), ref_opt.hessian_params())
            )
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert got == want and refresher.refreshes == len(want) and refresher.skipped == 0
    assert (want == [0, 3, 6, 9]) if refresh_prob is None else (want[0] == 0 and 1 < len(want) < STEPS)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["sophia_h", "sophia_g"])
def test_shared_forward_matches_fresh_forward(name):
    """Sharing the training forward changes the cost, not the result (to rounding)."""
    runs = []
    for share in (True, False):
        model = _model()
        opt = get_spec(name).cls(model.parameters(), lr=1e-2)
        refresher = HessianRefresher(opt, every_k=4)
        assert refresher.estimator_name == get_spec(name).hessian
        assert _refresher_loop(model, opt, refresher, _batches(), share=share) == [0, 4, 8]
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_loads_with_weights_only_and_resumes_the_streams():
    """Straight 12 steps == 6 steps, checkpoint (torch.save/torch.load(weights_only=True)), 6 steps."""
    batches = _batches()

    def make():
        model = _model()
        opt = SophiaH(model.parameters(), lr=1e-2)
        return model, opt, HessianRefresher(opt, refresh_prob=0.4, seed=2)

    model, opt, refresher = make()
    straight = _refresher_loop(model, opt, refresher, batches)

    model2, opt2, refresher2 = make()
    first = _refresher_loop(model2, opt2, refresher2, batches[:6])
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict(), "refresher": refresher2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["refresher"]["schedule_rng"].dtype == torch.uint8
    assert all(s.dtype == torch.uint8 for s in ckpt["refresher"]["estimator"]["generators"].values())
    model3, opt3, refresher3 = make()
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    refresher3.load_state_dict(ckpt["refresher"])
    assert refresher3.refreshes == len(first)
    second = _refresher_loop(model3, opt3, refresher3, batches[6:], start=6)
    assert first + second == straight and refresher3.refreshes == len(straight)
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_estimator_policy():
    model = _model()
    # auto: the estimator each registry optimizer consumes
    for name, spec in OPTIMIZERS.items():
        opt = spec.cls(model.parameters(), lr=1e-3)
        r = HessianRefresher(opt, every_k=10)
        assert r.estimator_name == spec.hessian and r.optimizer_name == name
        assert (r.estimator is None) == (spec.hessian == "none")
        assert r.estimator is None or r.estimator.name == spec.hessian
    # a mismatch names the valid combinations of the library's classes (library arguments, no config keys)
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="estimator='hutchinson' does not fit AdamW, which consumes 'none'") as err:
        HessianRefresher(adamw, "hutchinson")
    assert "SophiaG + 'gnb'; SophiaH, FlatSophia + 'hutchinson'; AdamW, SOAP + 'none'" in str(err.value)
    assert "hessian=" not in str(err.value) and "optimizer=" not in str(err.value)
    with pytest.raises(ValueError, match="SophiaG, which consumes 'gnb'"):
        HessianRefresher(SophiaG(model.parameters()), Hutchinson())
    with pytest.warns(UserWarning, match="uses no Hessian estimate"):
        HessianRefresher(adamw, every_k=3)
    # an estimator instance of the right kind is used as given
    est = Hutchinson(distribution="rademacher", n_probes=2, seed=7)
    r = HessianRefresher(SophiaH(model.parameters()), est)
    assert r.estimator is est
    # a first-order optimizer: every call is a no-op
    r = HessianRefresher(adamw)
    assert not r.shares_forward(0) and not r.maybe_refresh(0, None, None) and r.refreshes == 0
    for bad, match in [({"every_k": 0}, "every_k: 0"), ({"refresh_prob": 0.0}, "refresh_prob: 0.0")]:
        with pytest.raises(ValueError, match=match):
            HessianRefresher(SophiaH(model.parameters()), **bad)


def test_reduce_averages_one_flat_vector_and_disables_sharing():
    """``reduce`` gets every estimate in one flat float vector; its result is what the optimizer sees."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 2))
    unused = nn.Parameter(torch.randn(4))
    b = nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = SophiaH([w, unused, b], lr=1e-2)
    seen = []

    def reduce(flat):
        seen.append(flat.clone())
        return flat * 2  # stands in for the mean over ranks

    r = HessianRefresher(opt, every_k=1, reduce=reduce)
    assert not r.shares_forward(0)  # the training gradient must go through DDP's hooks
    estimates = [torch.ones(3, 2), None, torch.full((5,), 3.0, dtype=torch.float64)]
    reduced = r._reduce(estimates)
    assert len(seen) == 1 and seen[0].dtype == torch.float64 and seen[0].shape == (11,)
    assert reduced[1] is None and reduced[0].dtype == torch.float32 and reduced[2].dtype == torch.float64
    assert torch.equal(reduced[0], torch.full((3, 2), 2.0)) and torch.equal(
        reduced[2], torch.full((5,), 6.0, dtype=torch.float64)
    )
    assert r.apply(estimates) and r.refreshes == 1


def test_non_finite_estimate_is_counted_and_leaves_the_optimizer_untouched():
    model = _model()
    opt = SophiaH(model.parameters(), lr=1e-2)
    r = HessianRefresher(opt, every_k=1)
    x, y = _batches(1)[0]
    assert r.refresh(lambda: model(x), lambda out: _loss(out, y))
    before = [(v, v.clone()) for s in opt.state.values() for v in s.values()]
    assert len(before) >= 4
    bad = [torch.full_like(p, float("nan")) for p in opt.hessian_params()]
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        assert not r.apply(bad)
    assert r.refreshes == 1 and r.skipped == 1
    assert all(torch.equal(v, copy) for v, copy in before)


def test_distributed_mean_in_a_one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0)
        assert torch.equal(distributed_mean(t.clone()), t)
    finally:
        dist.destroy_process_group()


def test_gnb_refresher_samples_from_its_own_generator():
    """GNB through the refresher draws the same labels as the estimator called by hand (same seed)."""
    model = _model()
    opt = SophiaG(model.parameters(), lr=1e-2)
    r = HessianRefresher(opt, every_k=1, seed=3)
    x, y = _batches(1)[0]
    got = r.estimate(lambda: model(x), lambda out: _loss(out, y))
    want = GaussNewtonBartlett(seed=3)(lambda: model(x), None, opt.hessian_params())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


#: Every refresh form: (optimizer, hvp, shares the training forward).
FORMS = [
    ("sophia_h", "autograd", False),
    ("sophia_h", "autograd", True),
    ("sophia_g", "autograd", False),
    ("sophia_g", "autograd", True),
    ("sophia_h", "finite_difference", False),
]


def _bn_loop(name, hvp, share, refresh):
    """Six steps of a BatchNorm network; with ``refresh`` a refresh on every step whose estimate is
    thrown away, so the parameters follow the training gradients alone, as without a refresh."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    opt = get_spec(name).cls(model.parameters(), lr=1e-1)
    refresher = HessianRefresher(opt, model=model, every_k=1, hvp=hvp, seed=1)
    refresher.apply = lambda estimates: seen.append(estimates)
    seen = []
    for step, (x, y) in enumerate(_batches(6)):
        forward, loss_fn = (lambda x=x: model(x)), (lambda out, y=y: _loss(out, y))
        estimates = None
        if refresh and share:
            assert refresher.shares_forward(step)
            _, estimates = refresher.forward_backward(forward, loss_fn)
        else:
            with refresher.training_pass(step) if refresh else contextlib.nullcontext():
                loss_fn(forward()).backward()
        if refresh:
            assert refresher.maybe_refresh(step, forward, loss_fn, estimates)
        opt.step(**({"bs": 8} if isinstance(opt, SophiaG) else {}))
        opt.zero_grad(set_to_none=True)
    assert len(seen) == (6 if refresh else 0)
    return [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()]


@pytest.mark.parametrize(
    ("name", "hvp", "share"), FORMS, ids=[f"{n}-{h}-{'shared' if s else 'fresh'}" for n, h, s in FORMS]
)
def test_no_refresh_form_changes_the_buffers(name, hvp, share):
    """BatchNorm's running statistics and batch counter end as in a loop without refreshes: a fresh
    forward's updates are undone, and a shared forward, being the training forward itself, updates
    them exactly once per step, as training does."""
    params, buffers = _bn_loop(name, hvp, share, refresh=True)
    ref_params, ref_buffers = _bn_loop(name, hvp, share, refresh=False)
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))
    assert ref_buffers[-1].item() == 6  # num_batches_tracked: one per training forward
    for a, b in zip(buffers, ref_buffers):
        assert torch.equal(a, b)


def _fp16_refresh(name, share, scaler, x, y):
    """One refresh under float16 autocast on CPU: the estimate and the unscaled training gradient."""
    model = _model()
    opt = get_spec(name).cls(model.parameters(), lr=1e-2)
    # the double backward: the form that shares the training forward (hvp="auto" needs training_pass)
    refresher = HessianRefresher(opt, model=model, every_k=1, seed=3, scaler=scaler, hvp="autograd")
    seen = []
    refresher.apply = seen.append
    forward, loss_fn = (lambda: model(x)), (lambda out: _loss(out, y))
    with torch.autocast("cpu", dtype=torch.float16):
        estimates = None
        if share:
            _, estimates = refresher.forward_backward(forward, loss_fn)
        else:
            loss = loss_fn(forward())
            (scaler.scale(loss) if scaler else loss).backward()
        refresher.maybe_refresh(0, forward, loss_fn, estimates)
    if scaler:
        scaler.unscale_(opt)
    return seen[0], [p.grad for p in model.parameters()]


@pytest.mark.parametrize("share", [True, False], ids=["shared", "fresh"])
@pytest.mark.parametrize("name", ["sophia_h", "sophia_g"])
def test_grad_scaler_estimates_are_unscaled(name, share):
    """With float16 autocast and a GradScaler the estimate and the unscaled training gradient equal
    those without scaling: the refresh divides what it differentiated by the scale. (The default
    scale, 65536, overflows this model's float16 weight gradients: the scaler would halve it.)"""
    x, y = _batches(1)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    est, grads = _fp16_refresh(name, share, scaler, x, y)
    ref_est, ref_grads = _fp16_refresh(name, share, None, x, y)
    for a, b in zip(est, ref_est):  # measured: equal
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads):  # float16 rounding of the unscaled ones: 3.6e-7 of the norm
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    assert all(e.abs().max() > 1e-4 for e in est)


def test_grad_scaler_finite_difference_reads_the_scaled_training_gradient():
    """The training pass back-propagates scaler.scale(loss): the refresh takes the recorded gradient
    as the scaled one, and the estimate is that of an unscaled loop, bit for bit."""
    x, y = _batches(1)[0]
    runs = []
    for scaler in (torch.amp.GradScaler("cpu"), None):
        model = _model()
        opt = SophiaH(model.parameters(), lr=1e-2)
        refresher = HessianRefresher(opt, model=model, every_k=1, hvp="finite_difference", seed=3, scaler=scaler)
        refresher.apply = runs.append
        forward, loss_fn = (lambda model=model: model(x)), (lambda out: _loss(out, y))
        with refresher.training_pass(0):
            loss = loss_fn(forward())
            (scaler.scale(loss) if scaler else loss).backward()
        refresher.maybe_refresh(0, forward, loss_fn)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grad_scaler_overflow_skips_the_estimate_as_the_step():
    """A scale that overflows float16: the estimate is skipped (counted, Hessian state untouched) and
    the scaler skips the step."""
    x, y = _batches(1)[0]
    model = _model()
    opt = SophiaH(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    refresher = HessianRefresher(opt, model=model, every_k=1, seed=3, scaler=scaler, hvp="autograd")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        _, estimates = refresher.forward_backward(lambda: model(x), lambda out: _loss(out, y))
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        refresher.maybe_refresh(0, None, None, estimates)
    assert refresher.skipped == 1 and refresher.refreshes == 0
    assert all("hessian" not in s or not s["hessian"].any() for s in opt.state.values())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**39 and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match="Invalid scaler: 2.0"):
        HessianRefresher(opt, scaler=2.0)
