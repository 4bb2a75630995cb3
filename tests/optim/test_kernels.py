"""The Sophia family's step paths: single-tensor and multi-tensor kernels agree bit for bit on CPU,
and a user-compiled step (``torch.compile(optimizer.step)``) agrees with the eager step."""

from __future__ import annotations

import pytest
import torch

from flatsophia.optim import OPTIMIZERS, FlatSophia, SophiaG, SophiaH
from flatsophia.optim import sophia_g as g_mod
from flatsophia.optim import sophia_h as h_mod
from flatsophia.optim.sophia_g import sophia_g
from flatsophia.optim.sophia_h import sophia_h

SOPHIA = [spec.cls for spec in OPTIMIZERS.values() if spec.is_second_order]

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(half: bool = False):
    torch.manual_seed(0)
    ps = [
        torch.nn.Parameter(torch.randn(6, 7)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),  # a second dtype in the same group
        torch.nn.Parameter(torch.randn(5)),
    ]
    if half:  # bf16 and fp16 parameters (float32 state by default)
        ps += [torch.nn.Parameter(torch.randn(3, 4).bfloat16()), torch.nn.Parameter(torch.randn(6).half())]
    return ps


def _run(cls, steps=12, late=None, groups=None, half=False, collect=False, **kwargs):
    """Train ``_params()`` on random gradients; ``late`` gets no gradient during the first 5 steps;
    ``collect``: every other step collects stats (returned per step)."""
    ps = _params(half)
    groups = [{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}] if groups is None else groups(ps)
    opt = cls(groups, lr=1e-2, **kwargs)
    index = {id(p): i for i, p in enumerate(ps)}

    def draw(p, t, what):  # each tensor's own stream: independent of which others the optimizer holds
        g = torch.Generator().manual_seed(10_000 * what + 100 * index[id(p)] + t)
        return torch.randn(p.shape, generator=g).to(p.dtype)

    stats = []
    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (late is not None and i == late and t < 5) else draw(p, t, 1)
        if t % 4 == 0:
            opt.update_hessian([draw(p, t, 2) for p in opt.hessian_params()])
        opt.param_groups[0]["lr"] = 1e-2 * (1 - t / 20)
        opt.step(collect_stats=collect and t % 2 == 0)
        if collect and t % 2 == 0:
            stats.append(opt.stats())
    if collect:
        return ps, opt, stats
    return ps, opt


@pytest.mark.parametrize("cls", SOPHIA, ids=lambda c: c.__name__)
def test_multi_tensor_step_is_bit_identical_to_the_single_tensor_step_on_cpu(cls):
    extra = {"maximize": True, "bs": 64} if cls is SophiaG else {}
    a, opt_a = _run(cls, foreach=True, late=3, **extra)
    b, opt_b = _run(cls, foreach=False, late=3, **extra)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        assert opt_a.state[x].keys() == opt_b.state[y].keys()
        for key, value in opt_a.state[x].items():
            assert torch.equal(value, opt_b.state[y][key]), key
    if cls is FlatSophia:  # the mask took part
        assert any(bool((opt_a.state[p]["mask"] != 1).any()) for p in a)


def test_functional_entry_points_pick_the_kernel(monkeypatch):
    """``foreach=None``: the multi-tensor kernel only when every parameter is on CUDA; an explicit
    ``foreach`` is honoured, also with ``stats`` and a momentum of another dtype (``mu_dtype``)."""
    taken = []
    for mod, name in ((g_mod, "sophia_g"), (h_mod, "sophia_h")):
        for kind in ("single", "multi"):
            fn = getattr(mod, f"_{kind}_tensor_{name}")
            monkeypatch.setattr(mod, fn.__name__, lambda *a, _k=kind, _fn=fn, **kw: taken.append(_k) or _fn(*a, **kw))
    p, g = torch.zeros(3), torch.ones(3)

    def run_g(m=None, **kw):
        m = torch.zeros(3) if m is None else m
        sophia_g([p], [g], [m], [torch.zeros(3)], [torch.tensor(0.0)], lr=0.1, beta1=0.9,
                 weight_decay=0.0, scale=1.0, **kw)

    def run_h(m=None, **kw):
        m = torch.zeros(3) if m is None else m
        sophia_h([p], [g], [m], [torch.zeros(3)], [torch.tensor(0.0)], lr=0.1, beta1=0.9, gamma=0.01, eps=1e-8,
                 weight_decay=0.0, clip_threshold=1.0, **kw)

    for run in (run_g, run_h):
        taken.clear()
        run()  # CPU: single
        run(foreach=True)
        run(foreach=True, stats=[])
        run(torch.zeros(3, dtype=torch.bfloat16), foreach=True)
        run(torch.zeros(3, dtype=torch.bfloat16), foreach=False, stats=[])
        assert taken == ["single", "multi", "multi", "multi", "single"]


@pytest.mark.parametrize("cls", SOPHIA, ids=lambda c: c.__name__)
def test_foreach_with_stats_and_mixed_state_dtypes_matches_the_loop(cls):
    """The multi-tensor kernel with ``collect_stats`` and state dtypes other than the parameters'
    (bf16/fp16 parameters with float32 state, a bf16 momentum group) gives the loop's parameters,
    state and statistics bit for bit."""
    extra = {"bs": 64} if cls is SophiaG else {"gamma": 10.0}

    def groups(ps):
        return [{"params": ps[:2], "mu_dtype": torch.bfloat16}, {"params": ps[2:], "weight_decay": 0.0}]

    a, opt_a, stats_a = _run(cls, foreach=True, groups=groups, half=True, collect=True, **extra)
    b, opt_b, stats_b = _run(cls, foreach=False, groups=groups, half=True, collect=True, **extra)
    assert opt_a.state[a[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt_a.state[a[4]]["exp_avg"].dtype == opt_a.state[a[5]]["hessian"].dtype == torch.float32
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key, value in opt_a.state[x].items():
            assert value.dtype == opt_b.state[y][key].dtype and torch.equal(value, opt_b.state[y][key]), key
    assert stats_a == stats_b and 0 < stats_a[-1]["win_rate"].item() < 1


def test_foreach_is_validated():
    for cls in SOPHIA:
        with pytest.raises(ValueError, match=r"Invalid foreach: 'yes' \(expected None, True or False\)"):
            cls([torch.nn.Parameter(torch.zeros(3))], foreach="yes")
        assert cls([torch.nn.Parameter(torch.zeros(3))]).param_groups[0]["foreach"] is None


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "multi"])
def test_each_tensor_is_bias_corrected_with_its_own_step_count(foreach):
    """A parameter that joins late must not lend its (smaller) count to the tensors after it."""
    kw = dict(foreach=foreach, clip_threshold=None, gamma=1.0)  # unclipped: the step scales with 1 / (1 - beta1^t)
    with_late, opt = _run(SophiaH, late=1, groups=lambda ps: [{"params": [ps[0], ps[1], ps[3]]}], **kw)
    alone, _ = _run(SophiaH, groups=lambda ps: [{"params": [ps[0], ps[3]]}], **kw)
    assert opt.state[with_late[1]]["step"].item() == 7 and opt.state[with_late[3]]["step"].item() == 12
    assert torch.equal(with_late[3], alone[3])
    assert torch.equal(with_late[0], alone[0])


def _compile_or_skip():
    try:
        torch.compile(lambda x: x * 2)(torch.ones(2))
    except Exception as err:  # noqa: BLE001 - no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile (inductor needs a C++ compiler on CPU) failed here: {type(err).__name__}: {err}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("cls", [SophiaG, FlatSophia], ids=lambda c: c.__name__)
def test_compiled_step_equals_the_eager_step(cls, foreach, dtype):
    """``torch.compile(opt.step)`` gives the eager trajectory (up to fused-arithmetic rounding; bf16
    parameters with their float32 state too) and compiles once: the step counters are not baked
    into the graph."""
    _compile_or_skip()
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    atol = 1e-14 if dtype is torch.float64 else 2e-2  # bf16: one ulp of |p| < 4 where fused rounding differs
    ps = [torch.nn.Parameter(torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    # some coordinates clipped, some not
    extra = {"sharp_fraction": 0.3, "gamma": 10.0} if cls is FlatSophia else {"rho": 1.0, "bs": 20}
    kw = dict(lr=1e-2, weight_decay=0.1, foreach=foreach) | extra
    compiled, eager = cls(ps, **kw), cls(qs, **kw)
    step = torch.compile(compiled.step)
    for t in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in ps]
        for p, q, grad in zip(ps, qs, grads):
            p.grad, q.grad = grad.clone(), grad.clone()
        if t % 3 == 0:
            est = [torch.randn(p.shape, generator=g, dtype=torch.float64).abs().to(dtype) for p in ps]
            compiled.update_hessian(est)
            eager.update_hessian([e.clone() for e in est])
        with torch._dynamo.config.patch(error_on_recompile=t > 0):
            step()
        eager.step(collect_stats=t == 5)
        for p, q in zip(ps, qs):
            torch.testing.assert_close(p, q, rtol=0, atol=atol)
    for p, q in zip(ps, qs):
        for key, value in compiled.state[p].items():
            assert value.dtype == eager.state[q][key].dtype
            state_atol = 0 if key == "mask" else (1e-14 if dtype is torch.float64 else 1e-6)  # float32 state
            torch.testing.assert_close(value, eager.state[q][key], rtol=0, atol=state_atol)
        if dtype is torch.bfloat16:
            assert compiled.state[p]["hessian"].dtype == compiled.state[p]["exp_avg"].dtype == torch.float32
    assert compiled.state[ps[0]]["step"].item() == 6
    assert 0.1 < eager.stats()["win_rate"].item() < 0.9  # both regimes of the clip took part
    if cls is FlatSophia:
        assert any(bool((s["mask"] != 1).any()) for s in compiled.state.values())
    torch._dynamo.reset()
