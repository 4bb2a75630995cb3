"""The multi-tensor (``foreach``) eager step of the Sophia family: same bits as the per-tensor loop."""

from __future__ import annotations

import pytest
import torch

from flatsophia.optim import FlatSophia, SophiaG, SophiaH, _kernels

CLASSES = [SophiaG, SophiaH, FlatSophia]


def _params():
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(6, 7)),
        torch.nn.Parameter(torch.randn(7)),
        torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),  # a second dtype in the same group
        torch.nn.Parameter(torch.randn(5)),
    ]


def _params_with_a_large_one():
    """``_params()`` plus a tensor above the CPU multi-tensor threshold (the default split's loop side)."""
    return _params() + [torch.nn.Parameter(torch.randn(_kernels.FOREACH_CPU_MAX_NUMEL + 3))]


def _run(cls, steps=12, late=None, groups=None, make=_params, **kwargs):
    """Train ``make()`` on random gradients; ``late`` gets no gradient during the first 5 steps."""
    ps = make()
    if groups is None:
        groups = [{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}]
    else:
        groups = groups(ps)
    opt = cls(groups, lr=1e-2, **kwargs)
    index = {id(p): i for i, p in enumerate(ps)}

    def draw(p, t, what):  # each tensor's own stream: independent of which others the optimizer holds
        g = torch.Generator().manual_seed(10_000 * what + 100 * index[id(p)] + t)
        return torch.randn(p.shape, generator=g, dtype=p.dtype)

    for t in range(steps):
        for i, p in enumerate(ps):
            p.grad = None if (late is not None and i == late and t < 5) else draw(p, t, 1)
        if t % 4 == 0:
            if cls is SophiaG:
                opt.update_hessian()
            else:
                opt.update_hessian([draw(p, t, 2).abs() for p in opt.hessian_params()])
        opt.param_groups[0]["lr"] = 1e-2 * (1 - t / 20)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("cls", CLASSES)
def test_foreach_step_is_bit_identical_to_the_loop_on_cpu(cls):
    extra = {"maximize": True} if cls is SophiaG else {}
    a, opt_a = _run(cls, foreach=True, late=3, **extra)
    b, opt_b = _run(cls, foreach=False, late=3, **extra)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for key, value in opt_a.state[x].items():
            assert torch.equal(value, opt_b.state[y][key]), key
    if cls is FlatSophia:  # the mask took part
        assert any(bool((opt_a.state[p]["mask"] != 1).any()) for p in a)


@pytest.mark.parametrize("cls", CLASSES)
def test_default_split_small_multi_tensor_large_loop_is_bit_identical_to_the_loop(cls):
    """foreach=None on CPU: multi-tensor ops for small tensors, the loop for large ones; same bits."""
    a, opt_a = _run(cls, late=3, make=_params_with_a_large_one)
    b, opt_b = _run(cls, foreach=False, late=3, make=_params_with_a_large_one)
    assert opt_a.foreach is None
    for x, y in zip(a, b):
        assert torch.equal(x, y)
        for key, value in opt_a.state[x].items():
            assert torch.equal(value, opt_b.state[y][key]), key


def test_foreach_split_rules():
    small, large = torch.zeros(3), torch.zeros(_kernels.FOREACH_CPU_MAX_NUMEL)
    assert _kernels.foreach_split(None, [small, large, small]) == [True, False, True]
    assert _kernels.foreach_split(True, [small, large]) == [True, True]
    assert _kernels.foreach_split(False, [small, large]) == [False, False]
    meta = torch.zeros(3, device="meta")  # neither CPU nor CUDA: the loop
    assert _kernels.foreach_split(None, [meta, small]) == [False, True]


def test_foreach_defaults_to_off_on_cpu_and_is_validated():
    opt = SophiaH([torch.nn.Parameter(torch.zeros(3))])
    assert opt.foreach is None
    assert not _kernels.use_foreach(opt.foreach, [torch.zeros(1)])
    assert _kernels.use_foreach(True, [torch.zeros(1)])
    for cls in CLASSES:
        with pytest.raises(ValueError, match=r"Invalid foreach: 'yes' \(expected None, True or False\)"):
            cls([torch.nn.Parameter(torch.zeros(3))], foreach="yes")
        with pytest.raises(ValueError, match=r"Invalid compile: 'max' \(expected False, True or 'reduce-overhead'\)"):
            cls([torch.nn.Parameter(torch.zeros(3))], compile="max")


def test_a_mu_dtype_group_takes_the_loop_and_matches_it():
    def groups(ps):
        return [{"params": ps[:2], "mu_dtype": torch.bfloat16}, {"params": ps[3:]}]

    a, _ = _run(SophiaH, foreach=True, groups=groups)
    b, _ = _run(SophiaH, foreach=False, groups=groups)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_each_tensor_is_bias_corrected_with_its_own_step_count(foreach):
    """A parameter that joins late must not lend its (smaller) count to the tensors after it."""
    kw = dict(foreach=foreach, clip_threshold=None, gamma=1.0)  # unclipped: the step scales with 1 / (1 - beta1^t)
    with_late, _ = _run(SophiaH, late=1, groups=lambda ps: [{"params": [ps[0], ps[1], ps[3]]}], **kw)
    alone, _ = _run(SophiaH, groups=lambda ps: [{"params": [ps[0], ps[3]]}], **kw)
    # ps[3] comes after the late ps[1]: its trajectory is independent of ps[1]'s.
    assert torch.equal(with_late[3], alone[3])
    assert torch.equal(with_late[0], alone[0])


def test_hyperparameter_tensor_is_reused_until_a_value_changes():
    like = torch.zeros(2)
    cache: dict = {}
    t1 = _kernels.hyper_tensor([[1e-3, 0.1]], like, cache)
    assert _kernels.hyper_tensor([[1e-3, 0.1]], like, cache) is t1
    t2 = _kernels.hyper_tensor([[2e-3, 0.1]], like, cache)
    assert t2 is not t1 and t2[0].tolist() == pytest.approx([2e-3, 0.1])
    assert _kernels.hyper_tensor([[2e-3, 0.1]], like.double(), cache).dtype == torch.float64


def test_by_device_and_dtype_splits_parallel_lists():
    a, b, c = torch.zeros(2), torch.zeros(2, dtype=torch.float64), torch.zeros(3)
    out = _kernels.by_device_and_dtype([a, b, c], ["A", "B", "C"])
    assert [[len(x) for x in part] for part in out] == [[2, 2], [1, 1]]
    assert out[0][1] == ["A", "C"] and out[1][1] == ["B"]


# ---------------------------------------------------------------- SophiaG's h >= 0 shortcut
def test_nonneg_record_follows_in_place_writes_and_replacement():
    rec = _kernels.NonnegRecord()
    t = torch.zeros(4)
    rec.mark(t)
    assert rec.holds(t)
    t.add_(1.0)  # any in-place write voids the record
    assert not rec.holds(t)
    assert not rec.holds(torch.zeros(4))  # never recorded
    good, bad, nan = torch.rand(5), torch.tensor([1.0, -1e-30]), torch.tensor([float("nan"), 1.0])
    rec.verify([good, bad, nan, torch.zeros(0)])
    assert (rec.holds(good), rec.holds(bad), rec.holds(nan)) == (True, False, False)
    n = len(rec._records)
    del good
    rec.verify([])  # a freed tensor's record is dropped
    assert len(rec._records) == n - 1


@pytest.mark.parametrize("foreach", [False, True])
def test_sophia_g_skips_the_clamp_only_when_h_is_known_nonneg_and_keeps_the_bits(foreach, monkeypatch):
    """The shortcut is an identity: same bits as the always-clamped step; a negative h keeps the clamp."""
    a, opt_a = _run(SophiaG, foreach=foreach)
    assert all(opt_a._nonneg.holds(opt_a.state[p]["hessian"]) for p in a)  # the shortcut was in use
    monkeypatch.setattr(_kernels.NonnegRecord, "holds", lambda self, t: False)
    b, _ = _run(SophiaG, foreach=foreach)
    monkeypatch.undo()
    for x, y in zip(a, b):
        assert torch.equal(x, y)

    # A loaded state with a negative Hessian entry: not trusted, still clamped (denominator eps, so a
    # positive momentum moves the parameter down by lr; unclamped, the negative denominator would
    # flip the step's sign).
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SophiaG([p], lr=0.1, weight_decay=0.0, foreach=foreach)
    p.grad = torch.ones(3)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["hessian"] = torch.tensor([-1.0, 0.0, 1.0])
    opt.load_state_dict(sd)
    assert not opt._nonneg.holds(opt.state[p]["hessian"])
    before = p.detach().clone()
    opt.step()
    assert (p.detach() - before)[0].item() == pytest.approx(-0.1)
    p.grad = torch.ones(3)
    opt.update_hessian()  # 0.99 * (-1) + 0.01 * 1 < 0: still not trusted
    assert not opt._nonneg.holds(opt.state[p]["hessian"])
    opt.state[p]["hessian"].abs_()
    opt.update_hessian()  # verified once, then carried by induction
    assert opt._nonneg.holds(opt.state[p]["hessian"])
    opt.update_hessian()
    assert opt._nonneg.holds(opt.state[p]["hessian"])


def test_lerp_factor_folds_decay_only_where_it_is_safe():
    p32, p16 = torch.zeros(3), torch.zeros(3, dtype=torch.float16)
    assert _kernels.lerp_factor(1e-3, 0.1, 50.0, 2.0, p32, p32) == pytest.approx(-500.0)
    assert _kernels.lerp_factor(0.0, 0.1, 50.0, 2.0, p32, p32) == pytest.approx(-500.0)  # lr = 0: w = 0
    for args in [
        (1e-3, 0.0, 50.0, 2.0, p32, p32),  # no decay: the plain add is already one pass
        (1e-3, 0.1, 50.0, None, p32, p32),  # no clip: the direction is unbounded
        (torch.tensor(1e-3), 0.1, 50.0, 2.0, p32, p32),  # tensor lr
        (1e-3, 0.1, torch.tensor(50.0), 2.0, p32, p32),  # device-side scale
        (1e-3, 0.1, 50.0, 2.0, p32, p32.double()),  # momentum wider than the parameter
        (1e-3, 1e-36, 50.0, 2.0, p32, p32),  # k * bound would overflow float32
        (1e-3, 1e-3, 1.0, 10.0, p16, p16),  # 1e4 is too close to float16's max (65504)
        (1e-3, 0.5, 1.0, 1.0, p16, p16),  # float16: k * mu could overflow before the division
        (1e-3, 1.0, 1e30, 1e-30, p32, p32),  # |k| = 1e30: k * mu overflows float32 for |mu| > 3.4e8
        (1e-3, 0.1, 50.0, float("inf"), p32, p32),
    ]:
        assert _kernels.lerp_factor(*args) is None, args


@pytest.mark.parametrize("divisor", [False, True], ids=["sophia_h", "flat_sophia"])
@pytest.mark.parametrize("wd", [0.0, 0.3, 1e-37])
def test_sophia_h_kernel_matches_the_formula_with_and_without_the_lerp_fold(divisor, wd):
    """``theta (1 - lr wd) - lr * clip(mu_hat / max(gamma nu, eps), c) / mask``, float64, per path."""
    torch.manual_seed(3)
    n = 1000
    p, grad, mu, nu = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64), \
        torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64) * 0.5
    mask = torch.where(torch.rand(n) < 0.3, 10, 1).to(torch.int8) if divisor else None
    lr, beta1, bc, gamma, eps, clip = 0.02, 0.9, 0.3, 0.05, 1e-3, 1.0
    mu_new = beta1 * mu + (1 - beta1) * grad
    u = (mu_new / bc / torch.clamp(gamma * nu, min=eps)).clamp(-clip, clip)
    if mask is not None:
        u = u / mask
    expected = p * (1 - lr * wd) - lr * u
    stats = []
    _kernels.sophia_h_eager(p, grad, mu, nu, mask, lr=lr, wd=wd, beta1=beta1, bias_correction=bc, gamma=gamma,
                            eps=eps, clip=clip, scratch=_kernels.Scratch(), stats=stats)
    torch.testing.assert_close(mu, mu_new, rtol=1e-13, atol=1e-16)  # lerp: rounding differs
    torch.testing.assert_close(p, expected, rtol=1e-13, atol=1e-15)
    kept, sq = stats
    raw = (mu_new / bc / torch.clamp(gamma * nu, min=eps)).abs()
    assert 0 < kept.item() < n and kept.item() == (raw < clip).sum().item()
    torch.testing.assert_close(sq.double(), u.square().sum(), rtol=1e-6, atol=0)  # summed in float32
