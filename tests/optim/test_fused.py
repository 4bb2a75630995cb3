"""The fused CPU step (``fused=True``, a C++ extension) agrees with the eager step, falls back
where it does not apply, and keeps the optimizer's state and autograd's bookkeeping intact."""

from __future__ import annotations

import logging

import pytest
import torch

from flatsophia.optim import FlatSophia, SophiaG, SophiaH, _fused

CLASSES = [SophiaG, SophiaH, FlatSophia]


@pytest.fixture(scope="module", autouse=True)
def extension():
    """The extension must build where the tests run (CI has a C++ compiler; ninja is a test dependency)."""
    ext = _fused.extension()
    assert ext is not None, f"the fused extension did not build: {_fused.failure()}"
    return ext


def _params(dtype, layout="contiguous"):
    torch.manual_seed(0)  # drawn in float64 and rounded: float32 runs start from the same values
    big = torch.randn(70_000 + 3, dtype=torch.float64)  # several of the kernel's work items, a ragged tail
    mat = torch.randn(7, 5, dtype=torch.float64)
    if layout == "transposed":  # dense, not contiguous: the kernels index raw storage
        mat = torch.randn(5, 7, dtype=torch.float64).t()
    return [torch.nn.Parameter(t.to(dtype)) for t in (big, mat, torch.randn(3, dtype=torch.float64))]


def _grad(p, g):
    """A random gradient with the parameter's layout, as autograd makes them."""
    return torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))


def _run(cls, fused: bool, dtype=torch.float64, steps: int = 10, layout="contiguous", positive=False, **kw):
    ps = _params(dtype, layout)
    groups = [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0, "lr": 2e-2}]
    if cls is not SophiaG:
        groups[1]["clip_threshold"] = None  # a group without clipping
    opt = cls(groups, lr=1e-2, fused=fused, **kw)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for p in ps:
            p.grad = _grad(p, g)
        if t % 3 == 0:
            est = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in ps]
            opt.update_hessian([e.abs() if cls is SophiaG or positive else e for e in est])
        opt.param_groups[0]["lr"] = 1e-2 * (1 - t / 20)  # a schedule
        opt.step()
    return ps, opt


def test_extension_runs_on_torchs_threads(extension):
    """The kernels' at::parallel_for is serial unless the extension is built with OpenMP when torch
    uses it (the fused step ran on one thread before this was checked)."""
    if not torch.backends.openmp.is_available():
        pytest.skip("torch without OpenMP: at::parallel_for is its native pool")
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert extension.parallel_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_matches_eager_float64(cls):
    fused, opt = _run(cls, fused=True)
    eager, ref = _run(cls, fused=False)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for p, q in zip(fused, eager):
        sa, sb = opt.state[p], ref.state[q]
        assert sa["step"].item() == sb["step"].item() == 10
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=1e-12, atol=1e-14)
    if cls is FlatSophia:  # the mask was used: it damps some coordinates
        assert any((s["mask"] != 1).any() for s in opt.state.values())


def test_fused_sophia_g_maximize_and_bs():
    """SophiaG's per-group sign (maximize) and clip scale (rho * bs, also from ``step(bs=...)``)."""
    fused, opt = _run(SophiaG, fused=True, maximize=True, bs=64)
    eager, _ = _run(SophiaG, fused=False, maximize=True, bs=64)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    minimized, _ = _run(SophiaG, fused=True, bs=64)
    assert not torch.allclose(fused[0], minimized[0])  # the sign reached the kernel


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_float32_drifts_like_eager_float32(cls):
    """In float32 the fused step strays from the float64 trajectory no more than the eager step does
    (positive Hessian estimates and the clipped group: the unclipped one amplifies rounding chaotically)."""
    fused32, _ = _run(cls, fused=True, dtype=torch.float32, positive=True)
    eager32, _ = _run(cls, fused=False, dtype=torch.float32, positive=True)
    eager64, _ = _run(cls, fused=False, dtype=torch.float64, positive=True)
    # mean over coordinates: the maximum is one coordinate whose clip or sign decision flipped
    drift = lambda ps: torch.cat([(a.double() - b).abs().flatten() for a, b in zip(ps[:2], eager64[:2])]).mean()  # noqa: E731
    assert 0 < drift(fused32) <= 2 * drift(eager32), (drift(fused32), drift(eager32))


def test_fused_takes_dense_noncontiguous_layouts():
    fused, _ = _run(SophiaH, fused=True, layout="transposed")
    eager, _ = _run(SophiaH, fused=False, layout="transposed")
    assert fused[1].stride() == (1, 7)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_is_taken_and_bumps_versions(monkeypatch):
    """The fused path runs (the eager kernels are never called) and in-place bookkeeping holds."""
    import flatsophia.optim.sophia_h as sh

    def fail(*a, **k):
        raise AssertionError("eager step called")

    monkeypatch.setattr(sh, "sophia_h_eager", fail)
    monkeypatch.setattr(sh, "sophia_h_foreach", fail)
    ps = _params(torch.float32)
    opt = FlatSophia(ps, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    versions = [p._version for p in ps]
    opt.step()
    assert all(p._version > v for p, v in zip(ps, versions))
    assert all(s["step"].item() == 1 for s in opt.state.values())


def test_fused_falls_back_with_a_logged_reason(caplog):
    """bf16 momentum (mu_dtype) does not fit the kernel: the eager step runs, and says why once."""
    ps = _params(torch.float32)
    opt = SophiaH(ps, fused=True, mu_dtype=torch.bfloat16)
    ref_ps = _params(torch.float32)
    ref = SophiaH(ref_ps, mu_dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="flatsophia.optim._fused"):
        for _ in range(2):
            for p, q in zip(ps, ref_ps):
                p.grad = torch.full_like(p, 0.5)
                q.grad = torch.full_like(q, 0.5)
            opt.step()
            ref.step()
    msgs = [r.getMessage() for r in caplog.records if "fused=True" in r.getMessage()]
    assert len(msgs) == 1 and "dtype" in msgs[0], msgs
    for a, b in zip(ps, ref_ps):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fused_unbuildable_extension_falls_back(monkeypatch, caplog):
    monkeypatch.setattr(_fused, "_state", {"failure": "OSError: no compiler"})
    ps = _params(torch.float64)
    opt = SophiaG(ps, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # eager
    assert all(s["step"].item() == 1 for s in opt.state.values())
    assert _fused.extension() is None and _fused.failure() == "OSError: no compiler"


def test_extension_build_without_openmp_then_none(monkeypatch, caplog):
    """A failed OpenMP build is retried once without OpenMP (a warning says the step is serial); when
    that fails too, the reason names both and the optimizers take their other step."""
    calls = []
    serial = object()

    def fake_build(cap, openmp):
        calls.append(openmp)
        if openmp:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        return serial

    monkeypatch.setattr(_fused, "_OPENMP", ["-fopenmp"])
    monkeypatch.setattr(_fused, "_build", fake_build)
    monkeypatch.setattr(_fused, "_state", {})
    with caplog.at_level(logging.WARNING, logger=_fused.__name__):
        assert _fused.extension() is serial
    assert calls == [True, False] and _fused.failure() is None
    assert "without OpenMP" in caplog.text and "one thread" in caplog.text

    def never(cap, openmp):
        raise OSError(f"no compiler (openmp={openmp})")

    monkeypatch.setattr(_fused, "_build", never)
    monkeypatch.setattr(_fused, "_state", {})
    assert _fused.extension() is None
    assert _fused.failure() == "OSError: no compiler (openmp=True); without OpenMP: OSError: no compiler (openmp=False)"


def test_fused_resume_matches_uninterrupted():
    full, _ = _run(FlatSophia, fused=True, steps=10)
    # 5 steps, save, load into a fresh optimizer, 5 more: the same trajectory
    ps, opt = _run(FlatSophia, fused=True, steps=5)
    sd = opt.state_dict()
    opt2 = FlatSophia(
        [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0, "lr": 2e-2, "clip_threshold": None}],
        lr=1e-2,
        fused=True,
    )
    opt2.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    for t in range(10):  # replay the same random stream; apply only steps 5-9
        grads = [_grad(p, g) for p in ps]
        est = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in ps] if t % 3 == 0 else None
        if t < 5:
            continue
        for p, gr in zip(ps, grads):
            p.grad = gr
        if est is not None:
            opt2.update_hessian(est)
        opt2.param_groups[0]["lr"] = 1e-2 * (1 - t / 20)
        opt2.step()
    for a, b in zip(ps, full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_collect_stats_takes_the_eager_step():
    ps = _params(torch.float32)
    opt = SophiaH(ps, fused=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step(collect_stats=True)
    assert set(opt.stats()) >= {"win_rate", "update_rms"}


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_fused_value(bad):
    with pytest.raises(ValueError, match=r"Invalid fused: .*expected True or False"):
        SophiaH([torch.nn.Parameter(torch.zeros(2))], fused=bad)
