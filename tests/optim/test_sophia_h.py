"""SophiaH and FlatSophia: hand-computed steps, the sharpness mask, equivalence with the reference's
``update_fn`` (re-implemented here in a few lines of float64 torch), state layout and dtypes, stats."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from flatsophia.optim import FlatSophia, SophiaH

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- hand-computed steps
def _expected_mask(ds: list[list[float]], sharp_fraction: float, damp: int) -> list[list[int]]:
    """The reference's rule written out: tau = k-th largest |d| over everything, mask where |d| > tau."""
    flat = sorted((abs(v) for d in ds for v in d), reverse=True)
    k = int(sharp_fraction * len(flat))
    if k == 0:
        return [[1] * len(d) for d in ds]
    tau = flat[k - 1]
    return [[damp if abs(v) > tau else 1 for v in d] for d in ds]


def test_flat_sophia_hand_computed_float64():
    lr, b1, b2, gamma, eps, clip = 0.1, 0.9, 0.8, 0.5, 1e-3, 1.0
    sf, damp = 0.3, 4  # n = 10 -> k = 3
    wds = [0.1, 0.0, 0.0]
    init = [[0.5, -1.0, 2.0, 0.25, -0.75, 1.5], [0.1, -0.2, 0.3], [1.0]]
    shapes = [(2, 3), (3,), (1,)]
    params = [torch.tensor(v, dtype=F64).reshape(s).requires_grad_() for v, s in zip(init, shapes, strict=True)]
    opt = FlatSophia(
        [{"params": [params[0]], "weight_decay": wds[0]}, {"params": params[1:], "weight_decay": 0.0}],
        lr=lr,
        betas=(b1, b2),
        gamma=gamma,
        eps=eps,
        clip_threshold=clip,
        sharp_fraction=sf,
        dampening_factor=damp,
    )
    grads = [
        [[0.5, -0.3, 0.2, 0.05, -0.8, 0.1], [0.4, -0.05, 0.02], [-0.6]],
        [[0.4, -0.2, 0.1, 0.05, -0.6, 0.3], [0.3, 0.01, -0.02], [-0.5]],
        [[0.3, -0.1, 0.0, 0.04, -0.5, -0.2], [0.2, 0.02, 0.03], [-0.4]],
        [[0.2, 0.1, -0.1, 0.03, -0.4, -0.1], [0.1, -0.03, 0.01], [0.3]],
        [[0.1, 0.2, -0.2, 0.02, -0.3, 0.0], [0.05, 0.01, -0.01], [0.2]],
    ]
    # Refresh before steps 1 and 4 (index 0 and 3); negative entries included.
    estimates = {
        0: [[40.0, -30.0, 5.0, 0.5, 60.0, -2.0], [20.0, 0.0, -0.5], [8.0]],
        3: [[1.0, 50.0, -70.0, 2.0, 3.0, 45.0], [-4.0, 0.25, 6.0], [-9.0]],
    }
    theta = copy.deepcopy(init)
    mu = [[0.0] * len(v) for v in init]
    nu = [[0.0] * len(v) for v in init]
    mask = [[1] * len(v) for v in init]
    seen = {"neg_h": 0, "zero_h": 0, "clipped": 0, "unclipped": 0, "masked": 0, "masked_unclipped": 0}
    for t, g in enumerate(grads, start=1):
        if t - 1 in estimates:
            d = estimates[t - 1]
            assert opt.update_hessian([torch.tensor(v, dtype=F64).reshape(s) for v, s in zip(d, shapes, strict=True)])
            nu = [[b2 * n + (1 - b2) * e for n, e in zip(nt, dt, strict=True)] for nt, dt in zip(nu, d, strict=True)]
            new_mask = _expected_mask(d, sf, damp)
            if t > 1:
                assert new_mask != mask  # the second refresh moves the mask
            mask = new_mask
        for p, gv, s in zip(params, g, shapes, strict=True):
            p.grad = torch.tensor(gv, dtype=F64).reshape(s)
        opt.step()
        bc = 1 - b1**t
        for j in range(3):
            for i in range(len(theta[j])):
                mu[j][i] = b1 * mu[j][i] + (1 - b1) * g[j][i]
                raw = (mu[j][i] / bc) / max(gamma * nu[j][i], eps)
                u = max(-clip, min(clip, raw))
                seen["neg_h"] += nu[j][i] < 0
                seen["zero_h"] += nu[j][i] == 0
                seen["clipped"] += abs(raw) > clip
                seen["unclipped"] += abs(raw) < clip and nu[j][i] > 0
                seen["masked"] += mask[j][i] != 1
                seen["masked_unclipped"] += mask[j][i] != 1 and abs(raw) < clip
                theta[j][i] = theta[j][i] - lr * (u / mask[j][i] + wds[j] * theta[j][i])
        for j, (p, s) in enumerate(zip(params, shapes, strict=True)):
            st = opt.state[p]
            torch.testing.assert_close(p.detach(), torch.tensor(theta[j], dtype=F64).reshape(s), rtol=1e-13, atol=1e-14)
            torch.testing.assert_close(st["exp_avg"], torch.tensor(mu[j], dtype=F64).reshape(s), rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(st["hessian"], torch.tensor(nu[j], dtype=F64).reshape(s), rtol=1e-13, atol=1e-15)
            assert st["mask"].dtype == torch.int8
            assert st["mask"].flatten().tolist() == mask[j]
            assert st["step"].item() == t
    # The data above exercises every branch of the update.
    assert all(v > 0 for v in seen.values()), seen


# ----------------------------------------------------------------------------------- the mask
def _rand_params(sizes, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in sizes]


@pytest.mark.parametrize("sf", [0.05, 0.25, 0.5, 1.0])
def test_mask_count_is_global_top_k(sf):
    sizes = [(7, 5), (12,), (3, 2, 3), (4,)]  # n = 69
    params = _rand_params(sizes)
    opt = FlatSophia(
        [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0, "lr": 0.5}],
        sharp_fraction=sf,
        dampening_factor=7,
    )
    g = torch.Generator().manual_seed(1)
    # Group 2 gets much larger estimates: a per-group top-k would mask a different set.
    est = [torch.randn(s, generator=g, dtype=F64) * (1 if i < 2 else 10) for i, s in enumerate(sizes)]
    assert opt.update_hessian(est)
    n = sum(p.numel() for p in params)
    k = int(sf * n)
    masks = [opt.state[p]["mask"] for p in params]
    assert all(m.dtype == torch.int8 for m in masks)
    # tau is the k-th largest |d| itself and the comparison is strict (as in the reference), so with
    # distinct values the k-1 coordinates above it are damped.
    assert sum(int((m == 7).sum()) for m in masks) == max(k - 1, 0)
    assert set(torch.cat([m.flatten() for m in masks]).tolist()) <= {1, 7}
    expected = _expected_mask([e.flatten().tolist() for e in est], sf, 7)
    assert [m.flatten().tolist() for m in masks] == expected
    assert opt.stats()["masked_frac"].item() == pytest.approx(max(k - 1, 0) / n)


def test_mask_ties_are_strict_and_k_zero():
    p = torch.zeros(10, dtype=F64, requires_grad=True)
    opt = FlatSophia([p], sharp_fraction=0.4, dampening_factor=3)  # k = 4
    d = torch.tensor([5.0, -4.0, 3.0, -3.0, 3.0, 1.0, 0.0, 0.5, -3.0, 2.0], dtype=F64)
    opt.update_hessian([d])
    # tau = 4th largest |d| = 3: only |d| > 3 is damped, so 2 < k coordinates.
    assert opt.state[p]["mask"].tolist() == [3, 3, 1, 1, 1, 1, 1, 1, 1, 1]
    q = torch.zeros(10, dtype=F64, requires_grad=True)
    for sf in (0.05, 0.1, 0.15):  # k = 0 or k = 1: nothing masked
        opt0 = FlatSophia([q], sharp_fraction=sf)
        opt0.update_hessian([d])
        assert torch.equal(opt0.state[q]["mask"], torch.ones(10, dtype=torch.int8))


def test_mask_source_ema():
    params = _rand_params([(6,), (2, 3)])
    opt = FlatSophia(params, sharp_fraction=0.25, dampening_factor=5, mask_source="ema", betas=(0.9, 0.5))
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        est = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
        opt.update_hessian(est)
        hs = [opt.state[p]["hessian"].flatten().tolist() for p in params]
        assert [opt.state[p]["mask"].flatten().tolist() for p in params] == _expected_mask(hs, 0.25, 5)


def test_mask_persists_between_refreshes_and_none_estimate_keeps_mask():
    params = _rand_params([(4, 4), (5,)])
    opt = FlatSophia(params, sharp_fraction=0.2, dampening_factor=10)
    g = torch.Generator().manual_seed(3)
    opt.update_hessian([torch.randn(p.shape, generator=g, dtype=F64) for p in params])
    masks = [opt.state[p]["mask"].clone() for p in params]
    assert any((m != 1).any() for m in masks)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        opt.step()
        assert all(torch.equal(opt.state[p]["mask"], m) for p, m in zip(params, masks, strict=True))
    # A refresh that skips the second tensor leaves its mask as it was.
    opt.update_hessian([torch.randn(4, 4, generator=g, dtype=F64), None])
    assert torch.equal(opt.state[params[1]]["mask"], masks[1])
    assert not torch.equal(opt.state[params[0]]["mask"], masks[0])


def test_mask_options_are_one_for_all_groups():
    a, b = _rand_params([(3,), (2,)])
    opt = FlatSophia([{"params": [a]}, {"params": [b], "lr": 0.1}], sharp_fraction=0.3, mask_source="ema")
    assert [(g["sharp_fraction"], g["mask_source"]) for g in opt.param_groups] == [(0.3, "ema")] * 2
    for key, value in (("sharp_fraction", 0.5), ("dampening_factor", 3), ("mask_source", "random"), ("mask_seed", 1)):
        with pytest.raises(ValueError, match=f"Invalid {key}: .* every group must use the first group's"):
            FlatSophia([{"params": [a]}, {"params": [b], key: value}])


@pytest.mark.parametrize("kw", [{"sharp_fraction": 0.0}, {"dampening_factor": 1}])
def test_degenerate_flat_sophia_equals_sophia_h(kw):
    sizes = [(5, 4), (4,), (2, 2)]
    pa, pb = _rand_params(sizes, seed=4), _rand_params(sizes, seed=4)
    hyper = dict(lr=0.03, betas=(0.9, 0.95), gamma=0.5, eps=1e-6, weight_decay=0.01)
    fa = FlatSophia([{"params": pa[:1]}, {"params": pa[1:], "weight_decay": 0.0}], **hyper, **kw)
    sb = SophiaH([{"params": pb[:1]}, {"params": pb[1:], "weight_decay": 0.0}], **hyper)
    g = torch.Generator().manual_seed(5)
    for t in range(8):
        if t % 3 == 0:
            est = [torch.randn(s, generator=g, dtype=F64) for s in sizes]
            assert fa.update_hessian(est) and sb.update_hessian([e.clone() for e in est])
        for a, b in zip(pa, pb, strict=True):
            grad = torch.randn(a.shape, generator=g, dtype=F64)
            a.grad, b.grad = grad, grad.clone()
        fa.step()
        sb.step()
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a, b)
            assert torch.equal(fa.state[a]["exp_avg"], sb.state[b]["exp_avg"])
            assert torch.equal(fa.state[a]["hessian"], sb.state[b]["hessian"])
            assert "mask" not in fa.state[a]


# ----------------------------------------------------- the reference update_fn, re-implemented
def _ref_init(params, project_to_flat):
    return {
        "count": 0,
        "mu": [torch.zeros_like(p) for p in params],
        "nu": [torch.zeros_like(p) for p in params],
        "mask": [torch.ones_like(p, dtype=torch.int8) for p in params] if project_to_flat else None,
    }


def _ref_step(
    params,
    grads,
    state,
    hvp,
    vector,
    update_preconditioner,
    *,
    lr,
    wds,
    b1=0.965,
    b2=0.99,
    eps=1e-8,
    gamma=0.01,
    clip_threshold=1.0,
    project_to_flat=False,
    sharp_fraction=0.2,
    dampening_factor=10,
):
    """scale_by_sophia_h -> add_decayed_weights -> scale_by_learning_rate, on lists of tensors."""
    d = [h * v for h, v in zip(hvp, vector, strict=True)]
    nu = [(1 - b2) * e + b2 * n for e, n in zip(d, state["nu"], strict=True)] if update_preconditioner else state["nu"]
    count = state["count"] + 1
    mu = [(1 - b1) * g + b1 * m for g, m in zip(grads, state["mu"], strict=True)]
    mu_hat = [m / (1 - b1**count) for m in mu]
    updates = [m / torch.clamp(gamma * h, min=eps) for m, h in zip(mu_hat, nu, strict=True)]
    if clip_threshold is not None:
        updates = [torch.clamp(u, -clip_threshold, clip_threshold) for u in updates]
    mask = state["mask"]
    if project_to_flat:
        if update_preconditioner:
            flat = torch.cat([e.abs().flatten() for e in d])
            pth = torch.topk(flat, int(sharp_fraction * flat.numel())).values[-1]
            mask = [torch.where(e.abs() > pth, dampening_factor, 1).to(torch.int8) for e in d]
        updates = [u / m for u, m in zip(updates, mask, strict=True)]
    updates = [u + wd * p for u, wd, p in zip(updates, wds, params, strict=True)]
    new_params = [p + (-lr) * u for p, u in zip(params, updates, strict=True)]
    return new_params, {"count": count, "mu": mu, "nu": nu, "mask": mask}


@pytest.mark.parametrize("flat", [False, True], ids=["sophia_h", "flat_sophia"])
@pytest.mark.parametrize("gamma", [0.01, 1.0])
def test_matches_reference_update_fn(flat, gamma):
    sizes = [(4, 3), (3,), (2, 2, 2)]
    wds = [0.05, 0.0, 0.05]
    lr = 0.02
    params = _rand_params(sizes, seed=6)
    groups = [
        {"params": [params[0], params[2]], "weight_decay": 0.05},
        {"params": [params[1]], "weight_decay": 0.0},
    ]
    hyper = dict(betas=(0.965, 0.99), eps=1e-8, gamma=gamma, clip_threshold=1.0)
    if flat:
        opt = FlatSophia(groups, lr=lr, sharp_fraction=0.2, dampening_factor=10, **hyper)
    else:
        opt = SophiaH(groups, lr=lr, **hyper)
    order = opt.hessian_params()
    assert order == [params[0], params[2], params[1]]
    ref_params = [p.detach().clone() for p in params]
    state = _ref_init(ref_params, flat)
    g = torch.Generator().manual_seed(7)
    n_refresh = 0
    for t in range(30):
        grads = [torch.randn(s, generator=g, dtype=F64) for s in sizes]
        vector = [torch.randn(s, generator=g, dtype=F64) for s in sizes]
        hvp = [torch.randn(s, generator=g, dtype=F64) * 3 + 1 for s in sizes]
        refresh = t < 2 or torch.rand((), generator=g).item() < 0.3
        n_refresh += refresh
        if refresh:
            by_param = {id(p): v * h for p, v, h in zip(params, vector, hvp, strict=True)}
            assert opt.update_hessian([by_param[id(p)] for p in order])
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        opt.step()
        ref_params, state = _ref_step(
            ref_params,
            grads,
            state,
            hvp,
            vector,
            refresh,
            lr=lr,
            wds=wds,
            gamma=gamma,
            project_to_flat=flat,
            sharp_fraction=0.2,
            dampening_factor=10,
        )
        for i, p in enumerate(params):
            st = opt.state[p]
            torch.testing.assert_close(p.detach(), ref_params[i], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(st["exp_avg"], state["mu"][i], rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(st["hessian"], state["nu"][i], rtol=1e-12, atol=1e-15)
            if flat:
                assert torch.equal(st["mask"], state["mask"][i])
    assert 3 < n_refresh < 28


# ---------------------------------------------------------------- memory, dtypes, state_dict
def test_state_layout_memory():
    params = _rand_params([(8, 4), (4,)], dtype=torch.float32)
    flat = FlatSophia(params)
    for p in params:
        p.grad = torch.randn_like(p)
    flat.update_hessian([torch.randn_like(p) for p in params])
    flat.step()
    for p in params:
        st = flat.state[p]
        assert set(st) == {"step", "exp_avg", "hessian", "mask"}
        assert st["step"].ndim == 0
        assert st["exp_avg"].dtype == st["hessian"].dtype == p.dtype
        assert st["exp_avg"].shape == st["hessian"].shape == st["mask"].shape == p.shape
        assert st["mask"].dtype == torch.int8 and st["mask"].element_size() == 1
    sh = SophiaH([q := torch.randn(3, requires_grad=True)])
    q.grad = torch.randn(3)
    sh.step()
    assert set(sh.state[q]) == {"step", "exp_avg", "hessian"}


@pytest.mark.parametrize("mu_dtype", [torch.bfloat16, "bf16", "bfloat16"])
def test_mu_dtype_bfloat16(mu_dtype):
    sizes = [(6, 5), (5,)]
    pa = _rand_params(sizes, seed=8, dtype=torch.float32)
    pb = _rand_params(sizes, seed=8, dtype=torch.float32)
    lr = 1e-2
    fa = FlatSophia(pa, lr=lr, gamma=1.0, mu_dtype=mu_dtype)
    fb = FlatSophia(pb, lr=lr, gamma=1.0)
    g = torch.Generator().manual_seed(9)
    for t in range(6):
        if t % 3 == 0:
            est = [torch.rand(s, generator=g) for s in sizes]
            fa.update_hessian(est)
            fb.update_hessian(est)
        for a, b in zip(pa, pb, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fa.step()
        fb.step()
    for a, b in zip(pa, pb, strict=True):
        assert fa.state[a]["exp_avg"].dtype == torch.bfloat16
        assert fa.state[a]["hessian"].dtype == torch.float32
        assert torch.isfinite(a).all()
        torch.testing.assert_close(fa.state[a]["exp_avg"].float(), fb.state[b]["exp_avg"], rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(a, b, rtol=0, atol=6 * lr * 0.05)
        assert not torch.equal(a, b)  # the bf16 buffer does change something


def test_mu_dtype_wider_than_bf16_params():
    """A float32 momentum under bf16 parameters keeps float32 precision (not rounded to bf16)."""
    p = torch.randn(50, generator=torch.Generator().manual_seed(20)).bfloat16().requires_grad_()
    opt = SophiaH([p], lr=1e-3, betas=(0.9, 0.99), mu_dtype=torch.float32)
    g = torch.Generator().manual_seed(21)
    m = torch.zeros(50)
    for _ in range(3):
        p.grad = torch.randn(50, generator=g).bfloat16()
        opt.step()
        m = 0.9 * m + 0.1 * p.grad.float()
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16
    torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-6, atol=1e-7)
    assert not torch.equal(m.bfloat16().float(), m)  # bf16 rounding would have been visible


def test_bf16_params():
    sizes = [(6, 5), (5,)]
    p16 = _rand_params(sizes, seed=10, dtype=torch.bfloat16)
    p32 = [p.detach().float().requires_grad_() for p in p16]
    lr = 1e-2
    o16 = FlatSophia(p16, lr=lr, gamma=1.0, weight_decay=0.1)
    o32 = FlatSophia(p32, lr=lr, gamma=1.0, weight_decay=0.1)
    g = torch.Generator().manual_seed(11)
    start = [p.detach().clone() for p in p16]
    for t in range(5):
        if t % 2 == 0:
            est = [torch.randn(s, generator=g) for s in sizes]
            o16.update_hessian([e.bfloat16() for e in est])
            o32.update_hessian([e.bfloat16().float() for e in est])
        for a, b in zip(p16, p32, strict=True):
            grad = torch.randn(a.shape, generator=g).bfloat16()
            a.grad, b.grad = grad, grad.float()
        o16.step(collect_stats=True)
        o32.step(collect_stats=True)
    for a, b, s in zip(p16, p32, start, strict=True):
        st = o16.state[a]
        assert st["exp_avg"].dtype == st["hessian"].dtype == torch.float32 and a.dtype == torch.bfloat16
        assert st["mask"].dtype == torch.int8
        assert torch.equal(st["mask"], o32.state[b]["mask"])
        assert not torch.equal(a, s)
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.03)
    s16, s32 = o16.stats(), o32.stats()
    assert s16["update_rms"].dtype == torch.float32 and 0 < s32["update_rms"].item() <= 1
    assert s16["update_rms"].item() == pytest.approx(s32["update_rms"].item(), rel=0.05)
    assert s16["win_rate"].item() == pytest.approx(s32["win_rate"].item(), abs=0.1)


def _save_load(opt, new_opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    new_opt.load_state_dict(torch.load(buf, weights_only=True))
    return new_opt


@pytest.mark.parametrize(
    "dtype, mu_dtype",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float64)],
    ids=["bf16-momentum", "fp32-momentum-bf16-params", "fp64-momentum"],
)
def test_state_dict_round_trip_keeps_dtypes_and_lockstep(dtype, mu_dtype):
    """The momentum keeps ``mu_dtype`` (every bit, also when wider than the parameters), the mask int8."""
    sizes = [(5, 4), (4,)]
    pa, pb = _rand_params(sizes, seed=12, dtype=dtype), _rand_params(sizes, seed=12, dtype=dtype)
    kw = dict(lr=1e-2, gamma=1.0, sharp_fraction=0.25, dampening_factor=3, mu_dtype=mu_dtype)
    fa, fb = FlatSophia(pa, **kw), FlatSophia(pb, **kw)
    g = torch.Generator().manual_seed(13)

    def run(steps, start):
        for t in range(start, start + steps):
            if t % 4 == 0:
                est = [torch.randn(s, generator=g).to(dtype) for s in sizes]
                fa.update_hessian(est)
                fb.update_hessian([e.clone() for e in est])
            for a, b in zip(pa, pb, strict=True):
                a.grad = torch.randn(a.shape, generator=g).to(dtype)
                b.grad = a.grad.clone()
            fa.step()
            fb.step()

    run(6, 0)
    fb = _save_load(fb, FlatSophia(pb, **kw))
    for b in pb:
        st = fb.state[b]
        assert st["mask"].dtype == torch.int8, "load_state_dict must not cast the int8 mask"
        assert st["exp_avg"].dtype == mu_dtype, "load_state_dict must keep mu_dtype"
        assert st["hessian"].dtype == torch.float32 and st["step"].item() == 6  # float32 also under bf16
    run(7, 6)
    for a, b in zip(pa, pb, strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "hessian", "mask", "step"):
            assert torch.equal(fa.state[a][key], fb.state[b][key])


# ------------------------------------------------------------------------------------- stats
def test_sophia_h_stats_by_hand():
    params = _rand_params([(6, 5), (5,)], seed=14)
    lr, b1, gamma, eps = 0.01, 0.9, 0.5, 1e-8
    opt = SophiaH(params, lr=lr, betas=(b1, 0.99), gamma=gamma, eps=eps, weight_decay=0.0)
    g = torch.Generator().manual_seed(15)
    est = [torch.randn(p.shape, generator=g, dtype=F64) * 50 for p in params]
    opt.update_hessian(est)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=F64)
    opt.step(collect_stats=True)
    raw = torch.cat(
        [
            ((1 - b1) * p.grad / (1 - b1) / torch.clamp(gamma * opt.state[p]["hessian"], min=eps)).flatten()
            for p in params
        ]
    )
    s = opt.stats()
    assert 0 < s["win_rate"].item() < 1
    assert s["win_rate"].item() == pytest.approx((raw.abs() < 1).double().mean().item(), abs=1e-7)
    assert s["update_rms"].item() == pytest.approx(raw.clamp(-1, 1).square().mean().sqrt().item(), rel=1e-6)
    hs = torch.cat([opt.state[p]["hessian"].flatten() for p in params])
    assert s["hessian_mean"].item() == pytest.approx(hs.mean().item(), rel=1e-6)
    assert s["hessian_neg_frac"].item() == pytest.approx((hs < 0).double().mean().item())
    assert 0 < s["hessian_neg_frac"].item() < 1
    assert "masked_frac" not in s


def test_flat_sophia_stats_masked_frac_and_update_rms():
    params = _rand_params([(10, 10), (20,)], seed=16)
    opt = FlatSophia(params, sharp_fraction=0.2, dampening_factor=10, gamma=1.0, weight_decay=0.5)
    g = torch.Generator().manual_seed(17)
    opt.update_hessian([torch.randn(p.shape, generator=g, dtype=F64) for p in params])
    k = int(0.2 * 120)
    assert opt.stats()["masked_frac"].item() == pytest.approx((k - 1) / 120)  # ~= k / n
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=F64)
    before = [p.detach().clone() for p in params]
    opt.step(collect_stats=True)
    # update_rms is the RMS of the masked, clipped direction before lr and weight decay.
    u = torch.cat(
        [
            ((b * (1 - 0.5 * opt.param_groups[0]["lr"]) - p.detach()) / opt.param_groups[0]["lr"]).flatten()
            for p, b in zip(params, before, strict=True)
        ]
    )
    assert opt.stats()["update_rms"].item() == pytest.approx(u.square().mean().sqrt().item(), rel=1e-6)
