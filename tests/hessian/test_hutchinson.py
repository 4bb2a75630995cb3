"""Hutchinson estimator: unbiasedness against the exact Hessian diagonal, probes, seeding and
state, attention (double backward needs the math SDPA kernel), unused/linear parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from flatsophia.hessian import GaussNewtonBartlett, Hutchinson, build_estimator

F64 = torch.float64
# torch.func.hessian's first call goes through torch.jit internals that warn about their own deprecation.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyMLP().to(F64)
    x = torch.randn(8, 3, dtype=F64)
    y = torch.randn(8, 2, dtype=F64)
    loss_fn = lambda out: F.mse_loss(out, y)
    return model, x, y, loss_fn


def _exact_hessian(model: nn.Module, loss_of_output, inputs) -> torch.Tensor:
    """Full Hessian of the loss w.r.t. the flattened parameter vector (torch.func, forward-over-reverse)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in model.parameters()])

    def f(flat):
        chunks = torch.split(flat, sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_of_output(functional_call(model, params, inputs))

    return torch.func.hessian(f)(flat0)


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_mean_matches_exact_diagonal(distribution):
    model, x, _, loss_fn = _setup()
    H = _exact_hessian(model, loss_fn, (x,))
    diag = H.diagonal()
    assert H.shape == (26, 26) and (diag.abs() > 1e-6).sum() > 10
    est = Hutchinson(distribution=distribution, n_probes=500, seed=1)
    params = list(model.parameters())
    n_calls = 4  # 2000 probes in all: the mean of four 500-probe means
    mean = sum(_flat(est(lambda: model(x), loss_fn, params)) for _ in range(n_calls)) / n_calls
    # Per-probe variance of v_i (Hv)_i: sum_{j != i} H_ij^2, plus 2 H_ii^2 for Gaussian v (E v^4 = 3).
    off = (H**2).sum(1) - diag**2
    var = off + (2 * diag**2 if distribution == "gaussian" else 0)
    se = (var / (n_calls * 500)).sqrt()
    err = (mean - diag).abs()
    assert (err <= 5 * se + 1e-12).all(), (err / (se + 1e-300)).max()
    # The estimate is not trivially exact: the errors are of the order of the standard error.
    assert err.max() > 0.05 * se.max()


def test_single_probe_is_v_times_Hv():
    """Each estimate is exactly v * (H v) for the probes drawn from the estimator's generator."""
    model, x, _, loss_fn = _setup(1)
    H = _exact_hessian(model, loss_fn, (x,))
    params = list(model.parameters())
    for distribution in ("gaussian", "rademacher"):
        est = Hutchinson(distribution=distribution, seed=5)
        twin = Hutchinson(distribution=distribution, seed=5)
        for _ in range(3):
            d = _flat(est(lambda: model(x), loss_fn, params))
            v = _flat([twin.probe(p) for p in params])  # same generator stream, same order
            torch.testing.assert_close(d, v * (H @ v), rtol=1e-10, atol=1e-12)


def test_n_probes_averages():
    model, x, _, loss_fn = _setup(2)
    params = list(model.parameters())
    many = Hutchinson(n_probes=3, seed=9)(lambda: model(x), loss_fn, params)
    one = Hutchinson(n_probes=1, seed=9)
    singles = [one(lambda: model(x), loss_fn, params) for _ in range(3)]
    for i, m in enumerate(many):
        torch.testing.assert_close(m, sum(s[i] for s in singles) / 3, rtol=1e-12, atol=1e-14)


def test_probes():
    est = Hutchinson(distribution="rademacher", seed=0)
    v = est.probe(torch.empty(20000, dtype=F64))
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    frac = (v > 0).double().mean().item()
    assert abs(frac - 0.5) < 5 * (0.25 / 20000) ** 0.5
    assert est.probe(torch.empty(3, 2, dtype=torch.float32)).dtype == torch.float32
    g = Hutchinson(seed=0).probe(torch.empty(20000, dtype=F64))
    assert abs(g.mean().item()) < 5 / 20000**0.5 and abs(g.var().item() - 1) < 5 * (2 / 20000) ** 0.5


def test_seed_and_state_dict_restore_the_stream():
    model, x, _, loss_fn = _setup(3)
    params = list(model.parameters())
    run = lambda e: _flat(e(lambda: model(x), loss_fn, params))
    a, b = Hutchinson(seed=7), Hutchinson(seed=7)
    assert torch.equal(run(a), run(b))
    assert not torch.equal(run(Hutchinson(seed=8)), run(Hutchinson(seed=7)))
    sd = copy.deepcopy(a.state_dict())
    assert sd["name"] == "hutchinson" and sd["seed"] == 7 and "cpu" in sd["generators"]
    nxt = run(a)
    after = run(a)
    assert not torch.equal(nxt, after)
    a.load_state_dict(sd)
    assert torch.equal(run(a), nxt)
    c = Hutchinson(seed=123)
    c.load_state_dict(sd)
    assert c.seed == 7 and torch.equal(run(c), nxt)
    with pytest.raises(ValueError, match="gnb"):
        Hutchinson().load_state_dict(GaussNewtonBartlett().state_dict())


class TinyAttention(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def test_through_scaled_dot_product_attention():
    torch.manual_seed(0)
    model = TinyAttention().to(F64)
    x = torch.randn(2, 5, 8, dtype=F64)
    target = torch.randn(2, 5, 8, dtype=F64)
    loss_fn = lambda out: F.mse_loss(out, target)
    params = list(model.parameters())
    est, twin = Hutchinson(seed=3), Hutchinson(seed=3)
    d = est(lambda: model(x), loss_fn, params)
    assert all(e is not None and e.shape == p.shape and torch.isfinite(e).all() for e, p in zip(d, params, strict=True))
    # Independent check: v * (H v) from the exact Hessian (torch.func, math kernel).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        H = _exact_hessian(model, loss_fn, (x,))
    v = _flat([twin.probe(p) for p in params])
    torch.testing.assert_close(_flat(d), v * (H @ v), rtol=1e-9, atol=1e-12)
    # On CPU the default (flash) kernel has no double backward: forcing the math kernel is what
    # makes the estimate possible at all.
    try:
        Hutchinson(seed=3, math_sdpa=False)(lambda: model(x), loss_fn, params)
    except RuntimeError as err:
        assert "derivative" in str(err) or "not implemented" in str(err)


def test_unused_and_linear_parameters():
    torch.manual_seed(0)
    model = TinyMLP().to(F64)
    unused = nn.Parameter(torch.randn(3, dtype=F64))
    shift = nn.Parameter(torch.randn(2, dtype=F64))  # enters the loss linearly: zero curvature
    x = torch.randn(4, 3, dtype=F64)
    params = [*model.parameters(), unused, shift]
    loss_fn = lambda out: out.square().mean() + (shift * 3.0).sum()
    d = Hutchinson(seed=0)(lambda: model(x), loss_fn, params)
    assert d[-2] is None
    assert torch.equal(d[-1], torch.zeros(2, dtype=F64))
    assert all(e is not None and torch.isfinite(e).all() for e in d[:-2])


def test_all_parameters_linear_gives_zeros():
    w = nn.Parameter(torch.randn(3, dtype=F64))
    b = nn.Parameter(torch.randn(2, dtype=F64))
    unused = nn.Parameter(torch.randn(1, dtype=F64))
    d = Hutchinson(n_probes=2)(lambda: (w * 2.0).sum() + b.sum(), lambda out: out, [w, b, unused])
    assert torch.equal(d[0], torch.zeros(3, dtype=F64)) and torch.equal(d[1], torch.zeros(2, dtype=F64))
    assert d[2] is None


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"distribution": "uniform"}, "'uniform'"),
        ({"distribution": "Gaussian"}, "'Gaussian'"),
        ({"n_probes": 0}, "0"),
        ({"n_probes": -3}, "-3"),
        ({"n_probes": 2.0}, "2.0"),
        ({"n_probes": True}, "True"),
        ({"seed": "abc"}, "'abc'"),
    ],
)
def test_bad_arguments(kwargs, text):
    with pytest.raises(ValueError) as info:
        Hutchinson(**kwargs)
    assert text in str(info.value)


def test_build_estimator():
    assert build_estimator("none") is None
    h = build_estimator("hutchinson", seed=4, n_probes=2)
    assert isinstance(h, Hutchinson) and h.seed == 4 and h.n_probes == 2
    assert isinstance(build_estimator("gnb"), GaussNewtonBartlett)
    with pytest.raises(ValueError, match="'fisher'"):
        build_estimator("fisher")
