"""The opt-in compiled (fused) step of the Sophia family agrees with the eager step."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from flatsophia.optim import FlatSophia, SophiaG, SophiaH, _kernels


def _run(cls, compile: bool, steps: int = 12, **group1):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    opt = cls([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0, **group1}], lr=1e-2, compile=compile)
    g = torch.Generator().manual_seed(1)
    for t in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        if t % 4 == 0:
            if cls is SophiaG:
                opt.update_hessian()
            else:
                opt.update_hessian([torch.randn(p.shape, generator=g) for p in ps])
        opt.param_groups[0]["lr"] = 1e-2 * (1 - t / 20)  # a schedule must not break the compiled path
        opt.step()
    return ps, opt


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SophiaG, SophiaH, FlatSophia])
def test_compiled_step_matches_eager(cls):
    compiled, opt = _run(cls, compile=True)
    kernel = _kernels.SOPHIA_G_COMPILED if cls is SophiaG else _kernels.SOPHIA_H_COMPILED
    if kernel.failure is not None:
        pytest.skip(f"torch.compile unavailable on this machine: {kernel.failure}")
    eager, _ = _run(cls, compile=False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The mask and the int8 dtype survive the compiled path.
    if cls is FlatSophia:
        assert all(s["mask"].dtype == torch.int8 for s in opt.state.values())


@pytest.mark.slow
def test_compiled_sophia_g_maximize_per_group_matches_eager():
    """One group maximizes, the other minimizes: the compiled step negates each parameter's
    gradient by its own group."""
    compiled, _ = _run(SophiaG, compile=True, maximize=True)
    if _kernels.SOPHIA_G_COMPILED.failure is not None:
        pytest.skip(f"torch.compile unavailable on this machine: {_kernels.SOPHIA_G_COMPILED.failure}")
    eager, _ = _run(SophiaG, compile=False, maximize=True)
    minimized, _ = _run(SophiaG, compile=False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled[0], minimized[0], rtol=1e-6, atol=1e-7)
    assert (compiled[1] - minimized[1]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("cls", [SophiaG, SophiaH, FlatSophia])
def test_multi_tensor_kernel_matches_eager(cls, monkeypatch):
    """The multi-tensor form compiled for CUDA, compiled here on the CPU (same code, other backend)."""
    fn = _kernels._sophia_g_multi_foreach if cls is SophiaG else _kernels._sophia_h_multi_foreach
    kernel = _kernels.CompiledKernel(fn)
    where = "sophia_g.SOPHIA_G_COMPILED" if cls is SophiaG else "sophia_h.SOPHIA_H_COMPILED"
    monkeypatch.setattr(f"flatsophia.optim.{where}", kernel)
    compiled, opt = _run(cls, compile=True)
    if kernel.failure is not None:
        pytest.skip(f"torch.compile unavailable on this machine: {kernel.failure}")
    eager, _ = _run(cls, compile=False)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(int(s["step"]) == 12 for s in opt.state.values())


@pytest.mark.slow
def test_reduce_overhead_mode_is_the_compiled_step_on_cpu():
    a, _ = _run(SophiaH, compile="reduce-overhead")
    b, _ = _run(SophiaH, compile=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_compile_failure_falls_back_to_eager_and_says_why(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    kernel = _kernels.CompiledKernel(_kernels._sophia_h_multi)
    monkeypatch.setattr(_kernels, "SOPHIA_H_COMPILED", kernel)
    monkeypatch.setattr("flatsophia.optim.sophia_h.SOPHIA_H_COMPILED", kernel)
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING):
        fallback, _ = _run(SophiaH, compile=True, steps=3)
    eager, _ = _run(SophiaH, compile=False, steps=3)
    assert kernel.failure == "RuntimeError: no C++ compiler found"
    assert sum("torch.compile of the optimizer step is unavailable" in r.message for r in caplog.records) == 1
    for a, b in zip(fallback, eager):
        assert torch.equal(a, b)


def test_cuda_graph_mode_marks_each_state_tensor_static_once(monkeypatch):
    marked = []
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t: marked.append(t))
    kernel = _kernels.CompiledKernel(_kernels._sophia_g_multi)
    a, b = torch.zeros(3), torch.zeros(4)
    kernel._mark_static([[a, b], [a]])
    kernel._mark_static([[a, b]])
    assert [id(t) for t in marked] == [id(a), id(b)]
    c = torch.zeros(3)  # a new state tensor (e.g. after a resume) is marked too
    kernel._mark_static([[a, c]])
    assert [id(t) for t in marked] == [id(a), id(b), id(c)]


@pytest.mark.parametrize("cls", [SophiaH, FlatSophia])
def test_user_compiled_step_does_not_recompile_every_step(cls):
    """``torch.compile(opt.step)``: the step counts stay tensors while traced (no constant per step)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    opt = cls(ps, lr=1e-2)
    opt.update_hessian([torch.rand_like(p) for p in ps])
    counter = CompileCounter()  # counts traced frames without running Inductor
    step = torch.compile(opt.step, backend=counter)
    eager = [p.detach().clone() for p in ps]
    ref = cls([torch.nn.Parameter(p) for p in eager], lr=1e-2)
    ref.update_hessian([torch.rand_like(p) for p in ps])
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))  # a copy: loading may alias the tensors
    frames = []
    for _ in range(6):
        g = [torch.randn(p.shape) for p in ps]
        for p, q, gi in zip(ps, ref.param_groups[0]["params"], g):
            p.grad, q.grad = gi.clone(), gi.clone()
        step()
        ref.step()
        frames.append(counter.frame_count)
    assert frames[-1] == frames[2], frames  # no new compilation after the first steps
    for p, q in zip(ps, ref.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()
