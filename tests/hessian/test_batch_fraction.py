"""HessianRefresher(batch_fraction=f): the refresh estimates on the first ceil(f * B) examples.

The oracle is the estimator called by hand on the sliced batch, with the same probes, labels and
dropout masks; the finite difference's split training pass (the subset, then the rest) must give the
whole batch's gradient, and a BatchNorm network is never split.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.hessian import GaussNewtonBartlett, HessianRefresher, Hutchinson
from flatsophia.hessian.base import capture_rng_state, replayed_rng
from flatsophia.hessian.subset import batch_statistics_layers, subset_size
from flatsophia.optim import SophiaG, SophiaH

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _net(bn: bool = False, dtype=F64) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16)] if bn else [nn.Linear(6, 16)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(dtype)


def _batches(n: int, dtype=F64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 6, generator=g, dtype=F64).to(dtype)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()))
    return out


def test_subset_size_and_split_of_a_nested_batch():
    assert [subset_size(f, 8) for f in (0.01, 0.125, 0.25, 0.3, 0.5, 1)] == [1, 1, 2, 3, 4, 8]
    assert subset_size(0.1, 30) == 3 and subset_size(0.7, 10) == 7  # not 4 and 8 (0.1 * 30 = 3.0000000000000004)
    opt = SophiaH(_net().parameters())
    r = HessianRefresher(opt, model=None, batch_fraction=0.25, hvp="autograd")
    batch = {"x": torch.arange(16.0).reshape(8, 2), "meta": [torch.arange(8), "name", torch.tensor(3.0)]}
    (head, tail), sub = r.split(batch), r.subset(batch)
    assert torch.equal(head["x"], batch["x"][:2]) and torch.equal(tail["x"], batch["x"][2:])
    assert torch.equal(sub["meta"][0], torch.arange(2)) and torch.equal(tail["meta"][0], torch.arange(2, 8))
    assert sub["meta"][1:] == ["name", batch["meta"][2]] == tail["meta"][1:]  # other leaves go to both
    assert r.subset_size(3) == 1 and r.subset_size(1) == 1
    one = HessianRefresher(opt, hvp="autograd")
    assert one.subset(batch) is batch and one.subset_size(8) == 8
    with pytest.raises(ValueError, match=r"shapes \[\(8, 2\), \(7,\)\] do not share one leading"):
        r.subset((torch.zeros(8, 2), torch.zeros(7)))
    with pytest.raises(ValueError, match="Invalid batch size: 0"):
        r.subset_size(0)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "0.5", True, None, float("nan")])
def test_bad_batch_fraction_is_refused_naming_the_value(bad):
    with pytest.raises(ValueError, match=rf"Invalid batch_fraction: {bad!r}.*expected a number in \(0, 1\]"):
        HessianRefresher(SophiaH(_net().parameters()), model=_net(), batch_fraction=bad)


def test_batch_statistics_layers():
    net = _net(bn=True)
    assert batch_statistics_layers(net) == ["1 (BatchNorm1d)"] and batch_statistics_layers(net.eval()) == []
    assert batch_statistics_layers(nn.InstanceNorm1d(4, track_running_stats=True)) == ["InstanceNorm1d"]
    assert batch_statistics_layers(nn.Sequential(nn.LayerNorm(4), nn.InstanceNorm1d(4))) == []


#: (optimizer, hvp, BatchNorm): the forms at f < 1 and what each must reduce to
FORMS = [
    ("sophia_g", "autograd", False),  # a fresh forward on the subset
    ("sophia_h", "autograd", False),  # a fresh forward on the subset, double backward
    ("sophia_h", "finite_difference", False),  # the training pass split; the subset's gradient reused
    ("sophia_h", "finite_difference", True),  # BatchNorm: not split, both gradients in the refresh
]


def _loop(name, hvp, bn, fraction, steps=5, discard=False):
    """The module docstring's loop at ``batch_fraction``: a refresh every 2 steps. Returns the final
    parameters and buffers, and per refresh ``(estimates, oracle)``: the oracle is the estimator
    called by hand on the first ceil(f * 8) examples with the same probes/labels and dropout masks."""
    model = _net(bn)
    opt = (SophiaG if name == "sophia_g" else SophiaH)(model.parameters(), lr=1e-2)
    refresher = HessianRefresher(opt, model=model, every_k=2, seed=3, hvp=hvp, batch_fraction=fraction)
    oracle = GaussNewtonBartlett(seed=3) if name == "sophia_g" else Hutchinson(seed=3, hvp=hvp)
    seen, apply = [], refresher.apply

    for step, (x, y) in enumerate(_batches(steps)):
        split = refresher.splits(step)
        assert split == (hvp == "finite_difference" and not bn and fraction < 1 and step % 2 == 0)
        if split:
            (sx, sy), (rx, ry) = refresher.split((x, y))
            divisor = len(y) / len(sy)
            chunk_rng = capture_rng_state()
            with refresher.training_pass(step, loss_divisor=divisor, subset=True):
                (F.cross_entropy(model(sx), sy) / divisor).backward()
            (F.cross_entropy(model(rx), ry) * (len(ry) / len(y))).backward()
        else:
            assert not refresher.shares_forward(step) or fraction == 1
            with refresher.training_pass(step):
                F.cross_entropy(model(x), y).backward()
        sx, sy = refresher.subset((x, y))
        refresh_rng = capture_rng_state()

        def check(estimates, sx=sx, sy=sy, rng=chunk_rng if split else refresh_rng):
            with replayed_rng(rng):  # the split's subset chunk, else the refresh's own forward
                want = oracle(
                    lambda: model(sx), lambda out: F.cross_entropy(out, sy), opt.hessian_params(), module=model
                )
            if name == "sophia_g":  # ghat**2 on n/8 of the predictions: scaled by that share
                want = [None if w is None else w * math.sqrt(len(sy) / 8) for w in want]
            seen.append((estimates, want))
            return False if discard else apply(estimates)

        refresher.apply = check
        share = len(sy) / len(y)
        refresher.maybe_refresh(step, lambda sx=sx: model(sx), lambda out, sy=sy: F.cross_entropy(out, sy), share=share)
        opt.step(**({"bs": 8} if name == "sophia_g" else {}))
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], [b.clone() for b in model.buffers()], seen


@pytest.mark.parametrize(("name", "hvp", "bn"), FORMS, ids=[f"{n}-{h}{'-bn' if b else ''}" for n, h, b in FORMS])
def test_estimate_equals_the_estimator_on_the_subset(name, hvp, bn):
    warn = pytest.warns(UserWarning, match="batch statistics.*2 x batch_fraction") if bn else contextlib.nullcontext()
    with warn:
        _, _, seen = _loop(name, hvp, bn, 0.25)
    assert len(seen) == 3
    for estimates, want in seen:
        for got, ref in zip(estimates, want, strict=True):
            # float64; the finite difference reused the gradient of loss / 4 (exact) as the oracle its own
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # on the whole batch the estimates differ: the oracle's slice is what was estimated
    _, _, whole = _loop(name, hvp, bn, 1.0)
    assert not torch.allclose(whole[1][0][0], seen[1][0][0])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_split_training_gradient_equals_the_whole_pass(dtype):
    """The docstring's two chunks (the subset's loss / divisor, then the rest's times its share)
    add up to the whole batch's gradient, to rounding (no dropout: the masks would be drawn in
    another order)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    opt = SophiaH(model.parameters())
    refresher = HessianRefresher(opt, model=model, every_k=1, hvp="finite_difference", batch_fraction=0.3)
    x, y = _batches(1, dtype)[0]
    F.cross_entropy(model(x), y).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    assert refresher.splits(0)
    (sx, sy), (rx, ry) = refresher.split((x, y))
    assert len(sy) == 3
    divisor = len(y) / len(sy)
    with refresher.training_pass(0, loss_divisor=divisor, subset=True):
        (F.cross_entropy(model(sx), sy) / divisor).backward()
    (F.cross_entropy(model(rx), ry) * (len(ry) / len(y))).backward()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for w, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.grad, w, **tol)
    assert refresher._pass is not None and refresher._pass.loss_divisor == divisor


def test_batchnorm_is_never_split_and_keeps_training_as_without_refreshes():
    """f < 1 with a BatchNorm network: one warning, no split, and refreshes whose estimates are
    dropped leave the parameters and running statistics as a loop without refreshes."""
    with pytest.warns(UserWarning, match="batch statistics") as caught:
        params, buffers, seen = _loop("sophia_h", "finite_difference", True, 0.25, discard=True)
    assert sum("batch statistics" in str(w.message) for w in caught) == 1 and len(seen) == 3

    model = _net(bn=True)
    opt = SophiaH(model.parameters(), lr=1e-2)
    for x, y in _batches(5):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_a_whole_pass_at_f_below_one_records_no_gradient():
    """A training pass not marked ``subset=True`` is the whole batch's: its gradient is not the
    subset's, so it is not kept (the refresh takes the subset's gradients itself)."""
    model = _net()
    refresher = HessianRefresher(SophiaH(model.parameters()), model=model, hvp="finite_difference", batch_fraction=0.5)
    x, y = _batches(1)[0]
    with refresher.training_pass(0):
        F.cross_entropy(model(x), y).backward()
    assert refresher._pass is None
    assert not HessianRefresher(
        SophiaH(model.parameters()), model=model, hvp="autograd", batch_fraction=0.5
    ).shares_forward(0)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_gauss_newton_bartlett_keeps_its_expectation_on_a_subset(fraction):
    """``ghat**2`` from n predictions has expectation (1/n) x the per-prediction Gauss-Newton
    diagonal; scaled by ``share`` (maybe_refresh) the subset's estimate keeps the whole batch's
    expectation, so a subset adds noise only. The batch is 4 copies of 8 rows, so the first 8 rows
    have the whole batch's curvature exactly; over 400 label draws each the means agree to 10%,
    and without the scaling the ratio would be 1 / fraction."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5)).double()
    x = torch.randn(8, 6, dtype=torch.float64).repeat(4, 1)
    y = torch.zeros(32, dtype=torch.long)

    def mean_square(batch_fraction, draws=400):
        opt = SophiaG(model.parameters(), bs=32)
        refresher = HessianRefresher(opt, model=model, every_k=1, seed=7, batch_fraction=batch_fraction)
        sums = []
        refresher.apply = lambda est: sums.append(sum(float(e.square().sum()) for e in est)) or True
        sx, sy = refresher.subset((x, y))
        for _ in range(draws):
            refresher.maybe_refresh(0, lambda: model(sx), lambda out: F.cross_entropy(out, sy), share=len(sy) / 32)
        return sum(sums) / draws

    ratio = mean_square(fraction) / mean_square(1.0)
    assert 0.9 < ratio < 1.1, ratio


def test_gauss_newton_bartlett_on_a_subset_needs_the_share():
    refresher = HessianRefresher(SophiaG(_net().parameters(), bs=8), model=_net(), batch_fraction=0.5)
    with pytest.raises(ValueError, match=r"needs share=.*1 / batch_fraction"):
        refresher.maybe_refresh(0, None, None)
    with pytest.raises(ValueError, match=r"Invalid share: 1.5 \(expected a number in \(0, 1\]\)"):
        refresher.maybe_refresh(0, None, None, share=1.5)
    assert refresher.refreshes == 0
