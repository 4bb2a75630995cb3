"""Hutchinson with ``hvp="finite_difference"``: H v from two gradients.

Agreement with the exact ``v * (H v)`` (torch.func, the same dropout masks) on an MLP, a timm ViT
with dropout and stochastic depth, and the project's GPT; unbiasedness against the exact diagonal;
no side effects (parameters, buffers, the global RNG stream); no math-kernel forcing; half
precision refused; the refresher's training pass (hooks, accumulation, schedule).

Tolerances (relative L2 error of ``v * Hv`` against the exact product, default step): float64
1e-5 (measured 2e-8 to 3e-7), float32 1e-2 (measured 4.5e-4 MLP, 3-4e-3 ViT and GPT).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatsophia.hessian import HessianRefresher, Hutchinson
from flatsophia.hessian.base import capture_rng_state, replayed_rng
from flatsophia.models.components.gpt import GPT
from flatsophia.optim import SophiaH

F64 = torch.float64
FD = "finite_difference"
TOL = {torch.float64: 1e-5, torch.float32: 1e-2}
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


def _mlp(dtype=F64, dropout=0.0, bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype).train()


def _vit(dtype):
    import timm

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=8, num_classes=5, depth=2, embed_dim=24, num_heads=2)
    # dropout after the embedding and projections, and stochastic depth; timm's fused attention
    model = timm.create_model("vit_tiny_patch16_224", drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2, **kw)
    x = torch.randn(8, 3, 16, 16, dtype=dtype)
    y = torch.randint(0, 5, (8,))
    return model.to(dtype).train(), x, y


def _gpt(dtype):
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
    x = torch.randint(0, 11, (4, 8))
    y = torch.randint(0, 11, (4, 8))
    return model.to(dtype).train(), x, y


def _ce(y):
    return lambda out: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


def _exact_v_hv(model, x, loss_fn, vs, rng_state):
    """v * (H v) by forward-over-reverse (torch.func), with the global RNG at ``rng_state``: the same
    dropout masks as the pass that started there (math attention kernel: forward AD needs it)."""
    names = [n for n, _ in model.named_parameters()]
    primals = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(params):
        return loss_fn(functional_call(model, params, (x,)))

    with replayed_rng(rng_state), sdpa_kernel(SDPBackend.MATH):
        _, hv = torch.func.jvp(torch.func.grad(loss_of), (primals,), (dict(zip(names, vs)),))
    return _flat([v * hv[n] for n, v in zip(names, vs)])


def _training_pass(model, x, loss_fn):
    """The training step's pass: RNG state before it, and its gradient."""
    state = capture_rng_state()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x)), params)
    return state, params, grads


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("build", [_vit, _gpt], ids=["timm_vit_dropout", "gpt_dropout"])
def test_matches_exact_v_hv_with_the_training_masks(build, dtype):
    """Reusing the training pass's gradient and masks, with the default attention kernel."""
    model, x, y = build(dtype)
    loss_fn = _ce(y)
    state, params, grads = _training_pass(model, x, loss_fn)
    after = torch.get_rng_state()
    est, twin = Hutchinson(seed=3, hvp=FD), Hutchinson(seed=3)
    assert est.math_sdpa is False
    d = _flat(est.finite_difference(grads, lambda: model(x), loss_fn, params, rng_state=state, module=model))
    assert torch.equal(torch.get_rng_state(), after)  # the RNG stream is where the training pass left it
    exact = _exact_v_hv(model, x, loss_fn, [twin.probe(p) for p in params], state)
    assert _rel(d, exact) < TOL[dtype], _rel(d, exact)
    # the masks matter: replaying another RNG state gives a different (wrong) answer
    other = _exact_v_hv(model, x, loss_fn, [Hutchinson(seed=3).probe(p) for p in params], capture_rng_state())
    assert _rel(other, exact) > 10 * TOL[dtype]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_mlp_single_probe_matches_exact_hessian(dtype):
    model = _mlp(dtype, dropout=0.3)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randint(0, 3, (16,))
    loss_fn = _ce(y)
    state, params, grads = _training_pass(model, x, loss_fn)
    est, twin = Hutchinson(seed=1, hvp=FD), Hutchinson(seed=1)
    for _ in range(3):  # successive probes, one stream
        d = _flat(est.finite_difference(grads, lambda: model(x), loss_fn, params, rng_state=state, module=model))
        exact = _exact_v_hv(model, x, loss_fn, [twin.probe(p) for p in params], state)
        assert _rel(d, exact) < TOL[dtype] / 10, _rel(d, exact)


def test_unbiased_for_the_exact_diagonal():
    """The mean over many probes converges to diag(H) (torch.func.hessian), as the autograd form's."""
    model = _mlp()
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    loss_fn = _ce(y)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def f(flat):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        return loss_fn(functional_call(model, params, (x,)))

    H = torch.func.hessian(f)(_flat([p.detach() for p in model.parameters()]))
    diag = H.diagonal()
    est = Hutchinson(n_probes=500, seed=1, hvp=FD)
    params = list(model.parameters())
    n_calls = 4
    mean = sum(_flat(est(lambda: model(x), loss_fn, params, module=model)) for _ in range(n_calls)) / n_calls
    se = (((H**2).sum(1) - diag**2 + 2 * diag**2) / (n_calls * 500)).sqrt()  # Gaussian probes
    err = (mean - diag).abs()
    assert (err <= 5 * se + 1e-9).all(), (err / se).max()
    assert err.max() > 0.05 * se.max()


def test_n_probes_average_and_loss_divisor():
    model = _mlp(dropout=0.2)
    x, y = torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,))
    loss_fn = _ce(y)
    state, params, grads = _training_pass(model, x, loss_fn)
    fwd = lambda: model(x)  # noqa: E731
    many = Hutchinson(n_probes=3, seed=2, hvp=FD).finite_difference(grads, fwd, loss_fn, params, rng_state=state)
    one = Hutchinson(seed=2, hvp=FD)
    singles = [one.finite_difference(grads, fwd, loss_fn, params, rng_state=state) for _ in range(3)]
    for i, m in enumerate(many):
        torch.testing.assert_close(m, sum(s[i] for s in singles) / 3, rtol=1e-12, atol=1e-14)
    # a gradient of loss / 4 (4 accumulated micro-batches) with loss_divisor=4: the same estimate
    quarter = [g / 4 for g in grads]
    a = Hutchinson(seed=5, hvp=FD).finite_difference(quarter, fwd, loss_fn, params, rng_state=state, loss_divisor=4)
    b = Hutchinson(seed=5, hvp=FD).finite_difference(grads, fwd, loss_fn, params, rng_state=state)
    torch.testing.assert_close(_flat(a), _flat(b), rtol=1e-6, atol=1e-9)


def test_no_side_effects_on_parameters_buffers_and_rng():
    """Parameters bit-identical, BatchNorm statistics untouched, the global RNG stream unmoved."""
    model = _mlp(torch.float32, dropout=0.3, bn=True)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    loss_fn = _ce(y)
    state, params, grads = _training_pass(model, x, loss_fn)  # updates the BN statistics once
    params_before = [p.detach().clone() for p in params]
    buffers_before = [b.clone() for b in model.buffers()]
    rng_before = torch.get_rng_state()
    for p, g in zip(params, grads):
        p.grad = g.clone()  # the training step's gradient: the refresh must not touch .grad
    est = Hutchinson(seed=0, hvp=FD, n_probes=2)
    d = est.finite_difference(grads, lambda: model(x), loss_fn, params, rng_state=state, module=model)
    assert all(torch.isfinite(t).all() for t in d)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert all(torch.equal(a, b) for a, b in zip(params, params_before))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers_before))
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the fresh-forward form (both gradients taken by the estimator) leaves no trace either
    d = est(lambda: model(x), loss_fn, params, module=model)
    assert all(torch.isfinite(t).all() for t in d)
    assert all(torch.equal(a, b) for a, b in zip(params, params_before))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers_before))
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the parameters are restored even when the perturbed pass raises
    with pytest.raises(ZeroDivisionError):
        est.finite_difference(grads, lambda: 1 / 0, loss_fn, params, rng_state=state, module=model)
    assert all(torch.equal(a, b) for a, b in zip(params, params_before))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_runs_with_a_fused_attention_kernel_only():
    """No double backward, so no math kernel: with only the flash kernel allowed the estimate runs
    (and matches the math-kernel one), where the autograd form fails."""
    model, x, y = _vit(torch.float32)
    loss_fn = _ce(y)
    params = list(model.parameters())
    state = capture_rng_state()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        d = Hutchinson(seed=4, hvp=FD)(lambda: model(x), loss_fn, params, module=model)
        with pytest.raises(RuntimeError):
            Hutchinson(seed=4, math_sdpa=False)(lambda: model(x), loss_fn, params)
    with sdpa_kernel(SDPBackend.MATH), replayed_rng(state):
        ref = Hutchinson(seed=4, hvp=FD)(lambda: model(x), loss_fn, params, module=model)
    assert _rel(_flat(d), _flat(ref)) < 1e-2


def test_step_is_a_power_of_two_blind_to_the_norms_last_bits():
    """eps is the power of two nearest c (1 + |theta|) / |v| (log scale), and norms summed in another
    order (1e-15 relative apart, as a sharded sum's) give the same eps."""
    from flatsophia.hessian.hutchinson import finite_difference_step

    g = torch.Generator().manual_seed(0)
    for theta, v, c in (torch.rand(200, 3, generator=g, dtype=F64) * torch.tensor([1e3, 1e3, 1e-3])).tolist():
        eps = finite_difference_step(c, theta, v)
        raw = c * (1 + theta) / v
        assert math.frexp(eps)[0] == 0.5 and 2**-0.5 <= eps / raw <= 2**0.5
        for rel in (1e-15, -1e-15):
            assert finite_difference_step(c, theta * (1 + rel), v * (1 - rel)) == eps
    # either side of the midpoint 2**-0.5 between 0.5 and 1: nearest on a log scale
    assert finite_difference_step(1.0, 0.0, 2**0.5 * (1 - 1e-12)) == 1.0
    assert finite_difference_step(1.0, 0.0, 2**0.5 * (1 + 1e-12)) == 0.5


def test_half_precision_is_refused_with_a_reason():
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    model = _mlp(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64 parameters, got bfloat16: .*hvp=autograd"):
        Hutchinson(hvp=FD)(lambda: model(x.bfloat16()), _ce(y), list(model.parameters()))
    model = _mlp(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="under autocast"):
        Hutchinson(hvp=FD)(lambda: model(x), _ce(y), list(model.parameters()))
    with pytest.raises(ValueError, match="hvp: 'fd'"):
        Hutchinson(hvp="fd")
    with pytest.raises(ValueError, match="fd_scale: 0"):
        Hutchinson(hvp=FD, fd_scale=0)
    with pytest.raises(ValueError, match="finite_difference\\(\\)"):
        Hutchinson(hvp=FD).from_loss(model(x).sum(), list(model.parameters()))


def test_unused_and_linear_parameters():
    torch.manual_seed(0)
    model = _mlp()
    unused = nn.Parameter(torch.randn(3, dtype=F64))
    shift = nn.Parameter(torch.randn(3, dtype=F64))  # enters the loss linearly: zero curvature
    x = torch.randn(4, 6, dtype=F64)
    params = [*model.parameters(), unused, shift]
    d = Hutchinson(seed=0, hvp=FD)(lambda: model(x), lambda out: out.square().mean() + (shift * 3.0).sum(), params)
    assert d[-2] is None and torch.equal(d[-1], torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------------------------- refresher
def _loop(model, opt, refresher, batches, accumulate=1, discard=False):
    """A plain loop with accumulation; returns the estimates the refresher produced."""
    seen = []
    if discard:
        refresher.apply = lambda estimates: seen.append([e.clone() for e in estimates])
    for step in range(len(batches) // accumulate):
        for micro in range(accumulate):
            x, y = batches[step * accumulate + micro]
            last = micro == accumulate - 1
            with refresher.training_pass(step, accumulate) if last else contextlib.nullcontext():
                (_ce(y)(model(x)) / accumulate).backward()
        refresher.maybe_refresh(step, lambda x=x: model(x), _ce(y))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return seen


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_refresher_reuses_the_last_micro_batch_gradient():
    """With accumulation, the estimate is the finite difference on the last micro-batch, from that
    micro-batch's own gradient (before accumulation into .grad), with its dropout masks replayed."""
    batches = _batches(4)
    model = _mlp(torch.float32, dropout=0.3)
    opt = SophiaH(model.parameters(), lr=1e-2)
    refresher = HessianRefresher(opt, model=model, every_k=1, hvp=FD, seed=6)
    assert not refresher.shares_forward(0)
    (_ce(batches[0][1])(model(batches[0][0])) / 2).backward()  # the first micro-batch
    x, y = batches[1]
    with refresher.training_pass(0, loss_divisor=2):
        state = capture_rng_state()
        (_ce(y)(model(x)) / 2).backward()
    got = refresher.estimate(lambda: model(x), _ce(y))
    grads = torch.autograd.grad(_ce(y)(_replayed(model, x, state)), list(model.parameters()))
    want = Hutchinson(seed=6, hvp=FD).finite_difference(
        grads, lambda: model(x), _ce(y), list(model.parameters()), rng_state=state
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _replayed(model, x, state):
    with replayed_rng(state):
        return model(x)


def test_discarded_refreshes_leave_a_loop_bit_identical_to_no_refresh():
    """Every finite-difference estimate computed (on every step, with accumulation, BatchNorm and
    dropout) and thrown away: parameters, BatchNorm buffers and the RNG stream end as without any."""
    batches = _batches(12)
    runs = []
    for refresh in (True, False):
        model = _mlp(torch.float32, dropout=0.3, bn=True)
        opt = SophiaH(model.parameters(), lr=1e-2)
        refresher = HessianRefresher(opt, model=model, every_k=1 if refresh else 10**9, hvp=FD)
        if not refresh:
            refresher.estimator = None  # no refresh at all
        torch.manual_seed(123)
        seen = _loop(model, opt, refresher, batches, accumulate=2, discard=True)
        assert len(seen) == (6 if refresh else 0)
        runs.append((list(model.parameters()), list(model.buffers()), torch.get_rng_state()))
    (p1, b1, r1), (p2, b2, r2) = runs
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert all(torch.equal(a, b) for a, b in zip(b1, b2)) and b1[-1].item() == 12  # batches tracked
    assert torch.equal(r1, r2)


def test_refresher_schedule_and_non_finite_estimates():
    """The random schedule draws the same stream with the finite difference; an estimate that is
    NaN (a loss finite only at theta) is skipped, leaving the optimizer state and parameters alone."""
    batches = _batches(10)
    model = _mlp(torch.float32)
    opt = SophiaH(model.parameters(), lr=1e-2)
    fd = HessianRefresher(opt, model=model, refresh_prob=0.3, hvp=FD, seed=1)
    _loop(model, opt, fd, batches)
    auto = HessianRefresher(SophiaH(_mlp(torch.float32).parameters()), refresh_prob=0.3, seed=1)
    due = [auto.due(s) for s in range(10)]
    assert fd.refreshes == sum(due) and torch.equal(fd.rng.get_state(), auto.rng.get_state())

    theta = [p.detach().clone() for p in model.parameters()]

    def loss_fn(out):  # NaN anywhere but at theta
        moved = any(not torch.equal(p, t) for p, t in zip(model.parameters(), theta))
        return F.cross_entropy(out, y) * (float("nan") if moved else 1.0)

    x, y = batches[0]
    with fd.training_pass(0):
        loss_fn(model(x)).backward()
    state = [(v, v.clone()) for s in opt.state.values() for v in s.values()]
    assert len(state) >= 4
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        assert fd.maybe_refresh(0, lambda: model(x), loss_fn)
    assert fd.skipped == 1
    assert all(torch.equal(v, copy) for v, copy in state)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


def test_refresher_needs_the_model_and_warns_for_gnb():
    from flatsophia.optim import SophiaG

    model = _mlp(torch.float32)
    with pytest.raises(ValueError, match="needs model="):
        HessianRefresher(SophiaH(model.parameters()), hvp=FD)
    with pytest.warns(UserWarning, match="only applies to the Hutchinson"):
        r = HessianRefresher(SophiaG(model.parameters()), hvp=FD)
    assert r.estimator_name == "gnb" and not r.finite_difference
