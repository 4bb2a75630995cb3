"""SOAP: hand-derived first steps, invariants (AdamW limits, re-sort, orthogonality), edge shapes, state."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.optim import SOAP, create_optimizer, get_spec
from flatsophia.optim.soap import merged_shape

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(opt: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone().to(p.dtype)
    opt.step()


def _descending_eigvecs(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(m).eigenvectors.flip(1)


def _int_grad(shape, gen) -> torch.Tensor:
    """Small-integer gradients: their Gram matrices (times 1/2) are exact in float32, so the
    implementation's float32 rounding of the factors before ``eigh`` changes nothing."""
    return torch.randint(-3, 4, shape, generator=gen).double()


# --------------------------------------------------------------------------------------------------
# Hand-derived steps (float64)
# --------------------------------------------------------------------------------------------------


def test_first_call_builds_eigenbasis_and_does_not_move():
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64, generator=gen))
    p0 = p.detach().clone()
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    opt = SOAP([p], shampoo_beta=0.5, betas=(0.9, 0.99), weight_decay=0.5)
    _step(opt, [p], [g])
    assert torch.equal(p.detach(), p0)
    st = opt.state[p]
    assert st["step"].item() == 0
    for k, (gg, expected) in enumerate(zip(st["GG"], (g @ g.T, g.T @ g))):
        torch.testing.assert_close(gg, 0.5 * expected, rtol=1e-12, atol=1e-12)
        q = st["Q"][k]
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0], dtype=q.dtype), rtol=0, atol=1e-10)
        rotated = q.T @ gg @ q
        diag = rotated.diagonal()
        torch.testing.assert_close(rotated, torch.diag(diag), rtol=0, atol=1e-6)
        assert torch.all(diag[:-1] >= diag[1:] - 1e-6), "eigenvalues must be in descending order"
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()


@pytest.mark.parametrize("correct_bias", [True, False])
def test_first_steps_match_hand_derived_update(correct_bias):
    """Three calls, no refresh: Adam on Q_L^T G Q_R with the first call's bases, decay after the update."""
    gen = torch.Generator().manual_seed(1)
    shape = (4, 3)
    lr, b1, b2, sb, eps, wd = 0.1, 0.9, 0.99, 0.5, 1e-8, 0.2
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    grads = [_int_grad(shape, gen) for _ in range(3)]
    opt = SOAP(
        [p],
        lr=lr,
        betas=(b1, b2),
        shampoo_beta=sb,
        eps=eps,
        weight_decay=wd,
        precondition_frequency=100,
        correct_bias=correct_bias,
    )
    theta = p.detach().clone()

    g0 = grads[0]
    L, R = (1 - sb) * g0 @ g0.T, (1 - sb) * g0.T @ g0
    QL, QR = _descending_eigvecs(L), _descending_eigvecs(R)
    m = torch.zeros(shape, dtype=torch.float64)
    v = torch.zeros(shape, dtype=torch.float64)
    _step(opt, [p], [g0])
    for t, g in enumerate(grads[1:], start=1):
        g_hat = QL.T @ g @ QR
        m = b1 * m + (1 - b1) * g_hat
        v = b2 * v + (1 - b2) * g_hat**2
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t) if correct_bias else lr
        theta = theta - step_size * (QL @ (m / (v.sqrt() + eps)) @ QR.T)
        theta = theta * (1 - lr * wd)
        L, R = sb * L + (1 - sb) * g @ g.T, sb * R + (1 - sb) * g.T @ g
        _step(opt, [p], [g])
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)
    st = opt.state[p]
    assert st["step"].item() == 2
    torch.testing.assert_close(st["GG"][0], L, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["GG"][1], R, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-12, atol=1e-12)


def test_refresh_is_resort_power_iteration_and_qr():
    """With f=2 the call at t=2 refreshes the bases (after its update); the next call uses them."""
    gen = torch.Generator().manual_seed(2)
    shape = (5, 3)
    lr, b1, b2, sb, eps = 0.05, 0.9, 0.95, 0.5, 1e-8
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    grads = [_int_grad(shape, gen) for _ in range(5)]
    opt = SOAP([p], lr=lr, betas=(b1, b2), shampoo_beta=sb, eps=eps, weight_decay=0.0, precondition_frequency=2)
    theta = p.detach().clone()
    g0 = grads[0]
    facs = [(1 - sb) * g0 @ g0.T, (1 - sb) * g0.T @ g0]
    Qs = [_descending_eigvecs(f) for f in facs]
    m = torch.zeros(shape, dtype=torch.float64)
    v = torch.zeros(shape, dtype=torch.float64)
    _step(opt, [p], [g0])
    for t, g in enumerate(grads[1:], start=1):
        g_hat = Qs[0].T @ g @ Qs[1]
        m = b1 * m + (1 - b1) * g_hat
        v = b2 * v + (1 - b2) * g_hat**2
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        theta = theta - step_size * (Qs[0] @ (m / (v.sqrt() + eps)) @ Qs[1].T)
        facs = [sb * facs[0] + (1 - sb) * g @ g.T, sb * facs[1] + (1 - sb) * g.T @ g]
        if t % 2 == 0:
            m_orig = Qs[0] @ m @ Qs[1].T
            for k in range(2):
                est = torch.diagonal(Qs[k].T @ facs[k] @ Qs[k])
                order = torch.argsort(est, descending=True)
                v = v.index_select(k, order)
                Qs[k] = torch.linalg.qr(facs[k] @ Qs[k][:, order]).Q
            m = Qs[0].T @ m_orig @ Qs[1]
        _step(opt, [p], [g])
        # The implementation runs the power iteration + QR in float32, as the authors do.
        torch.testing.assert_close(p.detach(), theta, rtol=0, atol=1e-6)
    st = opt.state[p]
    for k in range(2):
        # Same basis up to column signs; the second moment is sign-invariant.
        overlap = (st["Q"][k].T @ Qs[k]).abs()
        torch.testing.assert_close(overlap, torch.eye(shape[k], dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------------


def _adamw_trajectory(shapes, n_steps, lr=0.01, wd=0.0, soap_kwargs=None, seed=3):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes] for _ in range(n_steps + 1)]
    ps = [nn.Parameter(x.clone()) for x in init]
    qs = [nn.Parameter(x.clone()) for x in init]
    soap = SOAP(ps, lr=lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=wd, **(soap_kwargs or {}))
    adamw = torch.optim.AdamW(qs, lr=lr, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0)
    _step(soap, ps, grads[0])  # the first call only builds the (empty) preconditioner
    for gs in grads[1:]:
        _step(soap, ps, gs)
        _step(adamw, qs, gs)
        with torch.no_grad():
            for q in qs:
                q.mul_(1 - lr * wd)  # SOAP decays after the update
    return ps, qs


@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_1d_params_without_precondition_1d_are_adamw(wd):
    ps, qs = _adamw_trajectory([(7,), (3,), ()], 25, wd=wd, soap_kwargs={"precondition_frequency": 1000})
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_max_precond_dim_zero_is_adam():
    shapes = [(6, 4), (3, 2, 5), (4, 3, 2, 2), (5,)]
    ps, qs = _adamw_trajectory(shapes, 25, soap_kwargs={"max_precond_dim": 0, "precondition_frequency": 3})
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)


def test_batched_unfactored_path_equals_per_tensor_path():
    """Contiguous unfactored tensors are updated with foreach ops; a non-contiguous twin takes the
    per-tensor path. Both must give the same numbers."""
    gen = torch.Generator().manual_seed(11)
    init = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    a = nn.Parameter(init.clone())
    b = nn.Parameter(init.T.contiguous().T)  # same values, transposed storage
    assert not b.is_contiguous()
    opt = SOAP([a, b], lr=0.01, max_precond_dim=0, weight_decay=0.1)
    for _ in range(6):
        g = torch.randn(6, 4, dtype=torch.float64, generator=gen)
        _step(opt, [a, b], [g, g])
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-14, atol=1e-15)
    assert not torch.equal(a.detach(), init)


def test_shampoo_beta_is_independent_of_beta2():
    gen = torch.Generator().manual_seed(4)
    g0, g1 = (torch.randn(4, 3, dtype=torch.float64, generator=gen) for _ in range(2))
    for sb, expected_sb in ((0.3, 0.3), (0.0, 0.0), (-1, 0.99)):
        p = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
        opt = SOAP([p], betas=(0.9, 0.99), shampoo_beta=sb, precondition_frequency=100)
        _step(opt, [p], [g0])
        _step(opt, [p], [g1])
        want = expected_sb * (1 - expected_sb) * g0 @ g0.T + (1 - expected_sb) * g1 @ g1.T
        torch.testing.assert_close(opt.state[p]["GG"][0], want, rtol=1e-12, atol=1e-12)
        # The second moment keeps beta2 whatever shampoo_beta is.
        q = opt.state[p]["Q"]
        g_hat = q[0].T @ g1 @ q[1]
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], 0.01 * g_hat**2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape", [(2,), (1, 2)])
def test_resort_moves_second_moment_with_its_eigenvector(shape):
    """The dominant direction switches from e1 to e2; the refresh re-sorts the basis and v with it."""
    b2 = 0.9
    p = nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = SOAP(
        [p],
        lr=0.01,
        betas=(0.9, b2),
        shampoo_beta=0.5,
        weight_decay=0.0,
        precondition_frequency=3,
        precondition_1d=True,
    )
    k = len(shape) - 1  # the dim with the 2x2 factor

    def grad(a, b):
        return torch.tensor([a, b], dtype=torch.float64).reshape(shape)

    _step(opt, [p], [grad(3.0, 0.0)])  # L = diag(4.5, 0): first column is +-e1
    q_old = opt.state[p]["Q"][k].clone()
    assert q_old[:, 0].abs().tolist() == [1.0, 0.0]
    _step(opt, [p], [grad(0.0, 4.0)])  # t=1: L = diag(2.25, 8)
    _step(opt, [p], [grad(0.0, 4.0)])  # t=2: L = diag(1.125, 12)
    v_old = opt.state[p]["exp_avg_sq"].reshape(2).clone()
    assert v_old[0] == 0 and v_old[1] > 0  # the energy sits on the second (e2) column
    _step(opt, [p], [grad(0.0, 0.0)])  # t=3: zero gradient, v *= b2, then refresh re-sorts
    q_new = opt.state[p]["Q"][k]
    v_new = opt.state[p]["exp_avg_sq"].reshape(2)
    match = (q_old.T @ q_new).abs()  # match[i, j] ~ 1 when new column j is old column i
    torch.testing.assert_close(match, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), atol=1e-6, rtol=0)
    for j in range(2):
        i = int(match[:, j].argmax())
        torch.testing.assert_close(v_new[j], b2 * v_old[i], rtol=1e-12, atol=0)
    assert v_new[0] > 0 and v_new[1] == 0


def test_bases_stay_orthogonal_over_refreshes():
    gen = torch.Generator().manual_seed(5)
    shapes = [(12, 7), (6, 3, 3, 3), (9,)]
    ps = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = SOAP(ps, precondition_frequency=2, precondition_1d=True)
    for _ in range(9):
        _step(opt, ps, [torch.randn(s, generator=gen) for s in shapes])
    n = 0
    for p in ps:
        for q in opt.state[p]["Q"]:
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=2e-5)
            n += 1
    assert n == 2 + 4 + 1


def test_normalize_grads_gives_unit_rms_update():
    gen = torch.Generator().manual_seed(6)
    p = nn.Parameter(torch.randn(6, 5, dtype=torch.float64, generator=gen))
    lr = 0.01
    opt = SOAP([p], lr=lr, weight_decay=0.0, normalize_grads=True, correct_bias=False)
    for _ in range(4):
        before = p.detach().clone()
        _step(opt, [p], [torch.randn(6, 5, dtype=torch.float64, generator=gen)])
    rms = (p.detach() - before).square().mean().sqrt()
    torch.testing.assert_close(rms, torch.tensor(lr, dtype=torch.float64), rtol=1e-9, atol=0)


def test_factors_only_for_dims_up_to_max_precond_dim():
    p = nn.Parameter(torch.randn(12, 4, 3))
    opt = SOAP([p], max_precond_dim=4)
    _step(opt, [p], [torch.randn(12, 4, 3)])
    assert [None if m is None else tuple(m.shape) for m in opt.state[p]["GG"]] == [None, (4, 4), (3, 3)]
    assert opt.state[p]["Q"][0] is None


@pytest.mark.parametrize(
    ("shape", "max_dim", "want"),
    [
        ((64, 3, 3, 3), 10000, (1728,)),
        ((64, 3, 3, 3), 100, (64, 27)),
        ((8, 1, 16), 100, (8, 16)),
        ((1, 1), 10, (1,)),
        ((), 10, (1,)),
        ((20000, 7), 10000, (20000, 7)),
        ((7, 20000, 3), 10000, (7, 20000, 3)),
        ((3, 5, 7, 11), 40, (15, 7, 11)),
        ((5,), 0, (5,)),
    ],
)
def test_merged_shape(shape, max_dim, want):
    got = merged_shape(shape, max_dim)
    assert got == want
    assert math.prod(got) == math.prod(shape)


# --------------------------------------------------------------------------------------------------
# Smoke tests: shapes, dtypes, degenerate gradients
# --------------------------------------------------------------------------------------------------


def _quadratic_run(shapes, steps=30, dtype=torch.float32, grad_fn=None, **kwargs):
    """Minimise sum_p ||A_p p - B_p|| style losses (per-parameter quadratics with cross-dim coupling)."""
    gen = torch.Generator().manual_seed(7)
    ps = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    targets = [torch.randn(s, generator=gen) for s in shapes]
    scales = [torch.rand(s, generator=gen) + 0.5 for s in shapes]
    kwargs.setdefault("lr", 0.05)
    kwargs.setdefault("precondition_frequency", 3)
    opt = SOAP(ps, **kwargs)

    def loss_fn():
        return sum(((p.float() - t) * s).square().sum() for p, t, s in zip(ps, targets, scales))

    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if grad_fn is not None:
            for p in ps:
                p.grad = grad_fn(p.grad)
        losses.append(float(loss.detach()))
        opt.step()
    losses.append(float(loss_fn().detach()))
    for p in ps:
        assert torch.isfinite(p).all()
        for v in opt.state[p].values():
            for t in v if isinstance(v, list) else [v]:
                assert t is None or torch.isfinite(t).all()
    return losses, opt, ps


ODD_SHAPES = [(7, 13, 5), (3, 1, 11), (1, 1), (8, 1, 16), (2, 3, 4, 5), (5,), (), (1,)]


@pytest.mark.parametrize("merge_dims", [False, True])
@pytest.mark.parametrize("max_precond_dim", [10000, 12, 0])
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_odd_shapes_train(merge_dims, max_precond_dim, data_format):
    losses, _, _ = _quadratic_run(
        ODD_SHAPES,
        merge_dims=merge_dims,
        max_precond_dim=max_precond_dim,
        data_format=data_format,
        precondition_1d=True,
    )
    # merge_dims with the default limit turns whole tensors into one long vector with a dense factor:
    # slower on this toy problem, but it must still make progress.
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("merge_dims", [False, True])
def test_conv_net_trains(data_format, merge_dims):
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 5, (32,))
    if data_format == "channels_last":
        net = net.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = SOAP(net.parameters(), lr=1e-2, merge_dims=merge_dims, data_format=data_format, precondition_frequency=4)
    first = None
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    with torch.no_grad():
        assert float(F.cross_entropy(net(x), y)) < 0.8 * first


def test_channels_last_merges_in_nhwc_order():
    """With data_format='channels_last' a 4-D tensor is viewed as (d0, d3, d1, d2) before merging."""
    p = nn.Parameter(torch.randn(6, 3, 3, 4))
    opt = SOAP([p], merge_dims=True, data_format="channels_last", max_precond_dim=12)
    _step(opt, [p], [torch.randn(6, 3, 3, 4)])
    assert [tuple(m.shape) for m in opt.state[p]["GG"]] == [(6, 6), (12, 12), (3, 3)]


def test_zero_gradients_do_not_break_anything():
    losses, opt, ps = _quadratic_run([(6, 4), (5,), (3, 2, 2)], steps=8, grad_fn=torch.zeros_like, weight_decay=0.0)
    assert losses[0] == losses[-1]  # nothing moved, nothing became NaN (checked in the helper)
    for p in ps:
        for q in opt.state[p]["Q"]:
            if q is not None:
                torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=1e-6)


def test_rank_deficient_gradients():
    def rank_one(g):
        if g.dim() < 2:
            return g
        m = g.reshape(g.shape[0], -1)
        return (m[:, :1] @ m[:1, :]).reshape(g.shape)

    _, opt, ps = _quadratic_run([(16, 8), (6, 3, 2)], steps=12, grad_fn=rank_one)  # finiteness checked there
    for q in opt.state[ps[0]]["Q"]:
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_params(dtype):
    losses, opt, ps = _quadratic_run([(12, 6), (4, 3, 3, 3), (6,)], steps=25, dtype=dtype, precondition_1d=True)
    assert losses[-1] < 0.8 * losses[0]
    st = opt.state[ps[0]]
    assert ps[0].dtype == dtype
    assert all(t.dtype == torch.float32 for t in (st["exp_avg"], st["exp_avg_sq"], *st["GG"], *st["Q"]))


def test_float64_state_stays_float64():
    _, opt, ps = _quadratic_run([(5, 4)], steps=5, dtype=torch.float64)
    st = opt.state[ps[0]]
    assert all(t.dtype == torch.float64 for t in (st["exp_avg"], st["exp_avg_sq"], *st["GG"], *st["Q"]))


def test_eigh_failure_falls_back(monkeypatch):
    real = torch.linalg.eigh
    calls = {"n": 0}

    def flaky(a, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    with pytest.warns(RuntimeWarning, match="eigh failed"):
        losses, opt, ps = _quadratic_run([(6, 5)], steps=15)
    assert calls["n"] >= 3
    assert losses[-1] < 0.8 * losses[0]
    for q in opt.state[ps[0]]["Q"]:
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), rtol=0, atol=2e-5)


def test_non_finite_first_gradient_falls_back_to_identity():
    p = nn.Parameter(torch.zeros(3, 2))
    opt = SOAP([p])
    g = torch.ones(3, 2)
    g[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="identity"):
        _step(opt, [p], [g])
    for q in opt.state[p]["Q"]:
        assert torch.equal(q, torch.eye(q.shape[0]))


def test_params_without_grad_and_empty_params_are_skipped():
    a, b, c = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(0, 3))
    opt = SOAP([a, b, c])
    for _ in range(3):
        a.grad = torch.randn(3, 2)
        c.grad = torch.randn(0, 3)
        opt.step()
    assert b not in opt.state and c not in opt.state
    assert opt.state[a]["step"].item() == 2


def test_closure_and_registry():
    p = nn.Parameter(torch.randn(3, 3))

    def closure():
        p.grad = None
        loss = p.square().sum()
        loss.backward()
        return loss

    opt = create_optimizer([p], "soap", lr=0.01)
    assert isinstance(opt, SOAP) and get_spec("soap").cls is SOAP
    assert SOAP.is_second_order is False and SOAP.hessian_estimator == "none"
    loss = opt.step(closure)
    assert float(loss.detach()) == float(p.detach().square().sum())  # the first call does not move p


# --------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------


def _model(dtype):
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 4), nn.Linear(4, 1))
    return net.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_in_lockstep(dtype):
    kwargs = dict(lr=0.01, precondition_frequency=3, merge_dims=True, precondition_1d=True, max_precond_dim=20)
    net_a = _model(dtype)
    opt_a = SOAP(net_a.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(10)
    xs = [torch.randn(8, 2, 6, 6, generator=gen).to(dtype) for _ in range(14)]

    def train(net, opt, batch):
        opt.zero_grad()
        net(batch).square().mean().backward()
        opt.step()

    for x in xs[:5]:  # crosses the first refresh (t=3)
        train(net_a, opt_a, x)
    buf = io.BytesIO()
    torch.save({"model": net_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    net_b = _model(dtype)
    net_b.load_state_dict(ckpt["model"])
    opt_b = SOAP(net_b.parameters(), **kwargs)
    opt_b.load_state_dict(ckpt["opt"])
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sb["exp_avg"].dtype == sa["exp_avg"].dtype == torch.float32
        assert all(t is None or t.dtype == torch.float32 for t in sb["Q"])
    for x in xs[5:]:  # another refresh at t=6, t=9 ...
        train(net_a, opt_a, x)
        train(net_b, opt_b, x)
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(pa, pb)
    assert opt_b.state[next(net_b.parameters())]["step"].item() == 13


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"lr": -1e-3}, -1e-3),
        ({"lr": float("nan")}, float("nan")),
        ({"betas": (1.0, 0.9)}, 1.0),
        ({"betas": (0.9, -0.1)}, -0.1),
        ({"betas": (0.9,)}, (0.9,)),
        ({"shampoo_beta": 1.0}, 1.0),
        ({"shampoo_beta": -0.5}, -0.5),
        ({"eps": 0.0}, 0.0),
        ({"eps": -1e-8}, -1e-8),
        ({"weight_decay": -0.01}, -0.01),
        ({"precondition_frequency": 0}, 0),
        ({"precondition_frequency": 2.5}, 2.5),
        ({"max_precond_dim": -1}, -1),
        ({"max_precond_dim": 100.0}, 100.0),
        ({"data_format": "nhwc"}, "nhwc"),
        ({"merge_dims": "yes"}, "yes"),
        ({"correct_bias": None}, None),
    ],
)
def test_invalid_hyperparameters(kwargs, value):
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        SOAP([p], **kwargs)
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        SOAP([{"params": [p], **kwargs}])  # per-group overrides are validated too


def test_moment_moves_to_new_bases_by_composed_rotation_where_cheaper(monkeypatch):
    """Conv-shaped tensors (sum d^3 < N sum d) move the first moment through Q_old^T Q_new; the
    result equals the round trip through the parameter's basis (float64), which matrices keep."""
    from flatsophia.optim import soap as soap_mod

    assert soap_mod._compose_rotations(torch.zeros(4, 3, 3, 3), [torch.eye(d) for d in (4, 3, 3, 3)])
    assert not soap_mod._compose_rotations(torch.zeros(6, 6), [torch.eye(6), torch.eye(6)])
    assert not soap_mod._compose_rotations(torch.zeros(6, 4), [torch.eye(6), None])  # 216 > 24 * 6

    def run(compose: bool):
        monkeypatch.setattr(soap_mod, "_compose_rotations", lambda m, bases: compose)
        gen = torch.Generator().manual_seed(5)
        p = nn.Parameter(torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen))
        opt = SOAP([p], lr=0.01, weight_decay=0.0, precondition_frequency=2)
        for _ in range(7):  # 3 refreshes
            _step(opt, [p], [torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)])
        return p.detach(), opt.state[p]

    p_rt, st_rt = run(False)
    p_c, st_c = run(True)
    torch.testing.assert_close(st_c["exp_avg"], st_rt["exp_avg"], rtol=0, atol=1e-12)
    torch.testing.assert_close(p_c, p_rt, rtol=0, atol=1e-12)
    for q_c, q_rt in zip(st_c["Q"], st_rt["Q"]):
        torch.testing.assert_close(q_c, q_rt, rtol=0, atol=1e-12)
