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


def _run(cls, steps=12, late=None, groups=None, **kwargs):
    """Train ``_params()`` on random gradients; ``late`` gets no gradient during the first 5 steps."""
    ps = _params()
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
