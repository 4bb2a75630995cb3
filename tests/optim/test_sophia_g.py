"""SophiaG: step-for-step parity with the authors' code (``sophia-opt``), state, stats, edge cases."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.bench.workloads import authors_sophia_g
from flatsophia.optim import SophiaG

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_cls():
    """The authors' SophiaG from ``sophia-opt`` (a requirement of the test extra)."""
    cls = authors_sophia_g()
    assert cls is not None, "sophia-opt is installed but exposes no SophiaG (as sophia_opt or sophia)"
    return cls


class Net(nn.Module):
    """Conv + MLP classifier on 6x6 single-channel images, 5 classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def _groups(model: Net, with_bs: int | None = None) -> list[dict]:
    groups = [
        {"params": [model.conv.weight], "lr": 2e-3, "weight_decay": 0.1},
        {"params": [model.fc1.weight, model.fc2.weight], "lr": 1e-3, "weight_decay": 0.2},
        {"params": [model.conv.bias, model.fc1.bias, model.fc2.bias], "lr": 3e-3, "weight_decay": 0.0},
    ]
    if with_bs is not None:
        # Two groups set it explicitly; the third inherits the constructor's ``bs``.
        groups[0]["bs"] = with_bs
        groups[1]["bs"] = with_bs
    return groups


def _batch(gen: torch.Generator, dtype, n: int = 32):
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=gen)
    return x, y


def _copy_grads(src: nn.Module, dst: nn.Module) -> None:
    for ps, pd in zip(src.parameters(), dst.parameters(), strict=True):
        pd.grad = None if ps.grad is None else ps.grad.detach().clone()


def _max_diffs(ours: SophiaG, ref, m_ours: nn.Module, m_ref: nn.Module) -> tuple[float, float]:
    dp = max((a - b).abs().max().item() for a, b in zip(m_ours.parameters(), m_ref.parameters(), strict=True))
    ds = 0.0
    for a, b in zip(m_ours.parameters(), m_ref.parameters(), strict=True):
        sa, sb = ours.state[a], ref.state[b]
        assert set(sa) == set(sb) == {"step", "exp_avg", "hessian"}
        assert sa["step"].item() == sb["step"].item()
        for key in ("exp_avg", "hessian"):
            assert sa[key].dtype == sb[key].dtype == a.dtype
            ds = max(ds, (sa[key] - sb[key]).abs().max().item())
    return dp, ds


def _train(ours, ref, m_ours, m_ref, gen, dtype, start, steps, bs, bs_mode, stats):
    """The nanoGPT loop: grad clip, step, Hessian refresh on a fresh batch when ``it % 10 == 9``.

    Every other step collects stats (``stats[it]`` = win rate; those steps take the single-tensor
    kernel), the others take the optimizer's own kernel choice."""
    worst_p = worst_s = 0.0
    for it in range(start, start + steps):
        x, y = _batch(gen, dtype)
        F.cross_entropy(m_ours(x), y).backward()
        torch.nn.utils.clip_grad_norm_(m_ours.parameters(), 1.0)
        _copy_grads(m_ours, m_ref)
        collect = it % 2 == 0
        if bs_mode == "per_call":
            ours.step(bs=bs, collect_stats=collect)
        else:
            ours.step(collect_stats=collect)
        ref.step(bs=bs)
        if collect:
            stats[it] = ours.stats()["win_rate"].item()
        m_ours.zero_grad(set_to_none=True)
        m_ref.zero_grad(set_to_none=True)
        if it % 10 == 9:
            x2, _ = _batch(gen, dtype)
            logits = m_ours(x2)
            with torch.no_grad():
                yhat = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)
            F.cross_entropy(logits, yhat).backward()
            _copy_grads(m_ours, m_ref)
            assert ours.update_hessian() is True
            ref.update_hessian()
            m_ours.zero_grad(set_to_none=True)
            m_ref.zero_grad(set_to_none=True)
        dp, ds = _max_diffs(ours, ref, m_ours, m_ref)
        worst_p, worst_s = max(worst_p, dp), max(worst_s, ds)
    return worst_p, worst_s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("bs_mode", ["per_call", "group"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "multi"])
def test_parity_with_sophia_opt(dtype, bs_mode, foreach):
    """Same operations in the same order as the authors' code: bit-identical parameters and state."""
    RefSophiaG = _reference_cls()
    torch.manual_seed(0)
    m_ours = Net().to(dtype)
    m_ref = copy.deepcopy(m_ours)
    bs = 2048  # "tokens" per step: puts the clip ratio on both sides of 1
    kw = dict(lr=1e-3, betas=(0.965, 0.99), rho=0.05, weight_decay=0.2)
    if bs_mode == "per_call":
        ours = SophiaG(_groups(m_ours), foreach=foreach, **kw)
    else:
        ours = SophiaG(_groups(m_ours, with_bs=bs), bs=bs, foreach=foreach, **kw)
        assert all(g["bs"] == bs for g in ours.param_groups)
    ref = RefSophiaG(_groups(m_ref), **kw)
    gen = torch.Generator().manual_seed(1)
    win_rates: dict[int, float] = {}
    worst_p, worst_s = _train(ours, ref, m_ours, m_ref, gen, dtype, 0, 60, bs, bs_mode, win_rates)
    print(f"\n[SophiaG parity {dtype} bs={bs_mode}] 60 steps: max|dparam|={worst_p:.3e} max|dstate|={worst_s:.3e}")
    # The first 9 steps run with h = 0 (all clipped); afterwards both regimes must be exercised.
    later = [w for it, w in win_rates.items() if it >= 10]
    assert win_rates[0] == 0.0
    assert 0.05 < max(later) and min(later) < 0.95
    assert worst_p == 0.0 and worst_s == 0.0

    # state_dict round trip: fresh optimizers loaded from the saved states continue in lockstep.
    buf_o, buf_r = io.BytesIO(), io.BytesIO()
    torch.save(ours.state_dict(), buf_o)
    torch.save(ref.state_dict(), buf_r)
    buf_o.seek(0)
    buf_r.seek(0)
    ours2 = SophiaG(_groups(m_ours), **kw)  # group bs (if any) must come back from the state_dict
    ref2 = RefSophiaG(_groups(m_ref), **kw)
    ours2.load_state_dict(torch.load(buf_o, weights_only=True))
    ref2.load_state_dict(torch.load(buf_r, weights_only=True))
    if bs_mode == "group":
        assert [g["bs"] for g in ours2.param_groups] == [bs] * 3
    for p in m_ours.parameters():
        assert ours2.state[p]["step"].item() == 60
        assert ours2.state[p]["exp_avg"].dtype == dtype
    worst_p2, worst_s2 = _train(ours2, ref2, m_ours, m_ref, gen, dtype, 60, 20, bs, bs_mode, win_rates)
    print(f"[SophiaG parity {dtype} bs={bs_mode}] +20 steps after reload: {worst_p2:.3e} / {worst_s2:.3e}")
    assert worst_p2 == 0.0 and worst_s2 == 0.0
    for p in m_ours.parameters():
        assert ours2.state[p]["step"].item() == 80


def test_maximize_parity_float64():
    RefSophiaG = _reference_cls()
    torch.manual_seed(3)
    p1 = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    p2 = p1.detach().clone().requires_grad_(True)
    ours = SophiaG([p1], lr=0.01, rho=0.1, weight_decay=0.05, maximize=True)
    ref = RefSophiaG([p2], lr=0.01, rho=0.1, weight_decay=0.05, maximize=True)
    for t in range(25):
        g = torch.randn(7, 3, dtype=torch.float64)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step(bs=16)
        ref.step(bs=16)
        if t % 5 == 0:
            e = torch.randn(7, 3, dtype=torch.float64)
            p1.grad, p2.grad = e.clone(), e.clone()
            ours.update_hessian()
            ref.update_hessian()
    assert torch.equal(p1, p2)
    assert torch.equal(ours.state[p1]["exp_avg"], ref.state[p2]["exp_avg"])
    assert torch.equal(ours.state[p1]["hessian"], ref.state[p2]["hessian"])


def test_hand_computed_float64():
    """Two steps and one refresh, checked against the formulas written out here."""
    p = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64, requires_grad=True)
    lr, b1, b2, rho, wd, bs = 0.1, 0.9, 0.95, 0.5, 0.2, 4
    opt = SophiaG([p], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, bs=bs)
    theta = p.detach().clone().tolist()
    m = [0.0] * 4
    h = [0.0] * 4
    grads = [[0.2, -0.4, 0.0, 1.0], [0.1, 0.3, -0.5, 0.0]]
    ghat = [0.3, -1.0, 0.05, 2.0]
    for step, g in enumerate(grads):
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        for i in range(4):
            theta[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            ratio = min(abs(m[i]) / (rho * bs * h[i] + 1e-15), 1.0)
            theta[i] -= lr * math.copysign(1.0, m[i]) * ratio if m[i] != 0 else 0.0
        assert torch.allclose(p.detach(), torch.tensor(theta, dtype=torch.float64), rtol=0, atol=1e-15)
        if step == 0:
            assert opt.update_hessian([torch.tensor(ghat, dtype=torch.float64)]) is True
            h = [(1 - b2) * e * e for e in ghat]
            assert torch.allclose(opt.state[p]["hessian"], torch.tensor(h, dtype=torch.float64), atol=1e-17)
    assert torch.allclose(opt.state[p]["exp_avg"], torch.tensor(m, dtype=torch.float64), atol=1e-17)
    assert opt.state[p]["step"].item() == 2


def test_update_hessian_explicit_equals_grad_path():
    torch.manual_seed(0)
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    frozen = torch.randn(2, requires_grad=False)
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    o1 = SophiaG([{"params": [a, frozen]}, {"params": [b]}])
    o2 = SophiaG([{"params": [a2, frozen]}, {"params": [b2]}])
    assert o1.hessian_params() == [a, b]
    ga, gb = torch.randn(4, 3), torch.randn(3)
    a.grad, b.grad = ga.clone(), gb.clone()
    assert o1.update_hessian() is True
    assert o2.update_hessian([ga, gb]) is True
    assert torch.equal(o1.state[a]["hessian"], o2.state[a2]["hessian"])
    assert torch.equal(o1.state[b]["hessian"], o2.state[b2]["hessian"])
    # None skips a parameter (no state created for it).
    o3 = SophiaG([a2.detach().clone().requires_grad_(), b2.detach().clone().requires_grad_()])
    o3.update_hessian([None, gb])
    assert len(o3.state) == 1


def test_stats_by_hand():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    c = torch.randn(5, requires_grad=True)
    lr, rho, bs, b1 = 0.01, 0.04, 100, 0.9
    opt = SophiaG([w, c], lr=lr, rho=rho, betas=(b1, 0.99), weight_decay=0.0, bs=bs)
    # Hessian EMA with mixed magnitudes so that some coordinates clip and some do not.
    for p in (w, c):
        st = opt._init_state(p, opt.param_groups[0])
        st["hessian"].copy_(torch.rand(p.shape) * 0.02)
    w.grad, c.grad = torch.randn(6, 5), torch.randn(5)
    opt.step(collect_stats=True)
    ratios = []
    for p in (w, c):
        st = opt.state[p]
        m = (1 - b1) * p.grad  # first step: m = (1 - b1) g
        assert torch.allclose(st["exp_avg"], m)
        ratios.append((m.abs() / (rho * bs * st["hessian"] + 1e-15)).clamp(max=1).flatten())
    r = torch.cat(ratios)
    s = opt.stats()
    assert 0 < s["win_rate"].item() < 1
    assert s["win_rate"].item() == pytest.approx((r < 1).double().mean().item(), abs=1e-7)
    assert s["update_rms"].item() == pytest.approx(r.square().mean().sqrt().item(), rel=1e-6)
    hs = torch.cat([opt.state[p]["hessian"].flatten() for p in (w, c)])
    assert s["hessian_mean"].item() == pytest.approx(hs.mean().item(), rel=1e-6)
    assert s["hessian_neg_frac"].item() == 0.0
    opt.state[w]["hessian"][0].fill_(-1.0)
    assert opt.stats()["hessian_neg_frac"].item() == pytest.approx(5 / 35)
    # Without collect_stats the last recorded figures stay; all values are 0-d tensors.
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in opt.stats().values())


def test_nonfinite_grad_estimate_is_skipped():
    """The no-argument form (reading ``p.grad``) skips a non-finite sample too (the list form: test_common)."""
    torch.manual_seed(0)
    p = torch.randn(5, requires_grad=True)
    q = torch.randn(2, 2, requires_grad=True)
    opt = SophiaG([p, q], bs=8)
    p.grad, q.grad = torch.randn(5), torch.randn(2, 2)
    opt.update_hessian()
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    for bad in (float("nan"), float("inf"), -float("inf")):
        q.grad = torch.randn(2, 2)
        q.grad[1, 0] = bad
        with pytest.warns(RuntimeWarning, match="NaN/inf"):
            assert opt.update_hessian() is False
        after = opt.state_dict()
        for k, st in before["state"].items():
            for key, v in st.items():
                assert torch.equal(v, after["state"][k][key])


def test_negative_hessian_step_is_bounded():
    """A hand-fed negative Hessian EMA gives a full clipped step lr (the reference would not)."""
    p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    lr, wd = 0.05, 0.1
    opt = SophiaG([p], lr=lr, weight_decay=wd, rho=0.04)
    opt._init_state(p, opt.param_groups[0])["hessian"].copy_(torch.tensor([-1.0, -1e-3, 0.0], dtype=torch.float64))
    p.grad = torch.tensor([0.3, -0.2, 1e-4], dtype=torch.float64)
    before = p.detach().clone()
    opt.step(bs=10)
    expected = before * (1 - lr * wd) - lr * torch.sign(p.grad)
    assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-15)


def test_bs_is_required_validated_and_positional_as_in_the_reference():
    """No silent default: a step without ``bs`` (call or group) is refused before anything changes."""
    p = torch.zeros(3, requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    opt = SophiaG([p, unused], lr=0.1, rho=0.5, weight_decay=0.0)
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="-4"):
        opt.step(bs=-4)
    with pytest.raises(ValueError, match=r"SophiaG needs bs.*gamma = rho \* bs.*group\(s\) \[0\]"):
        opt.step()
    assert not opt.state and not p.any()
    opt.update_hessian([torch.ones(3), None])  # h = 0.01 after one fold of 1 (beta2 = 0.99)
    opt.step(None, 8)  # the reference's positional form
    assert unused not in opt.state
    m, h = 1 - 0.965, 1 - 0.99
    torch.testing.assert_close(p, torch.full((3,), -0.1 * m / (0.5 * 8 * h)), rtol=1e-6, atol=0)  # unclipped
    ref = SophiaG([q := torch.zeros(3, requires_grad=True)], lr=0.1, rho=0.5, weight_decay=0.0, bs=8)
    q.grad = torch.ones(3)
    ref.update_hessian([torch.ones(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref.step()  # the group's bs
    assert torch.equal(p, q)
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt.step(None, 200)
    ref.step(bs=200)  # the call's bs over the group's
    assert torch.equal(p, q)


def test_closure_and_maximize_flag():
    p = torch.tensor([1.0], requires_grad=True)
    opt = SophiaG([p], lr=0.1, weight_decay=0.0)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure, 16)  # bs is checked after the closure made the gradients
    assert loss.item() == pytest.approx(1.0)
    assert p.item() == pytest.approx(0.9)  # h = 0: a full clipped step against the gradient
    opt2 = SophiaG([q := torch.tensor([1.0], requires_grad=True)], lr=0.1, weight_decay=0.0, maximize=True, bs=1)
    q.grad = torch.tensor([2.0])
    opt2.step()
    assert q.item() == pytest.approx(1.1)


@pytest.mark.parametrize("rho", [0.0, 1e-25], ids=["rho0", "rho_tiny"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "multi"])
def test_rho_zero_or_tiny_matches_the_authors(rho, foreach):
    """``rho * bs`` ~ 0: the denominator is ~1e-15, so sign steps while ``|m| > rho*bs*h + eps``."""
    RefSophiaG = _reference_cls()
    torch.manual_seed(0)
    m_ours = Net().double()
    m_ref = copy.deepcopy(m_ours)
    kw = dict(lr=1e-3, betas=(0.965, 0.99), rho=rho, weight_decay=0.2)
    ours, ref = SophiaG(_groups(m_ours), foreach=foreach, **kw), RefSophiaG(_groups(m_ref), **kw)
    start = [p.detach().clone() for p in m_ours.parameters()]
    gen = torch.Generator().manual_seed(2)
    for it in range(12):
        x, y = _batch(gen, torch.float64)
        F.cross_entropy(m_ours(x), y).backward()
        _copy_grads(m_ours, m_ref)
        if it % 4 == 0:
            ours.update_hessian()
            ref.update_hessian()
        ours.step(bs=480)
        ref.step(bs=480)
        m_ours.zero_grad(set_to_none=True)
        m_ref.zero_grad(set_to_none=True)
    assert _max_diffs(ours, ref, m_ours, m_ref) == (0.0, 0.0)
    # Sign steps: every coordinate with a gradient moved by about lr per step.
    moved = min((a - b).abs().max().item() for a, b in zip(m_ours.parameters(), start))
    assert moved > 5e-3
