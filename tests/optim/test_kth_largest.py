"""FlatSophia's fast exact threshold: ``kth_largest`` equals ``torch.kthvalue`` in every case."""

from __future__ import annotations

import pytest
import torch

from flatsophia.optim import FlatSophia
from flatsophia.optim import flat_sophia as fs


def _ref(flat, k):
    return torch.kthvalue(flat, flat.numel() - k + 1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frac", [0.0, 1e-6, 0.01, 0.2, 0.5, 0.99, 1.0])
def test_matches_kthvalue_on_large_inputs(dtype, frac):
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(600_000, generator=g, dtype=dtype).abs_()
    n = flat.numel()
    for k in {max(1, int(frac * n)), max(1, int(frac * n)) + 1, 1, n} - {n + 1}:
        assert torch.equal(fs.kth_largest(flat, k), _ref(flat, k)), k


def test_ties_and_heavy_duplicates():
    g = torch.Generator().manual_seed(1)
    # few distinct values: the threshold sits inside a huge tie
    flat = torch.randint(0, 7, (500_000,), generator=g).float()
    for k in (1, 3, 70_000, 71_429, 100_000, 250_000, 499_999, 500_000):
        assert torch.equal(fs.kth_largest(flat, k), _ref(flat, k)), k
    zeros = torch.zeros(300_000)
    assert torch.equal(fs.kth_largest(zeros, 60_000), _ref(zeros, 60_000))


@pytest.fixture
def kthvalue_calls(monkeypatch) -> list[int]:
    """The sizes of the inputs of every torch.kthvalue call made during the test."""
    calls = []
    orig = torch.kthvalue

    def spy(x, kk, *a, **kw):
        calls.append(x.numel())
        return orig(x, kk, *a, **kw)

    monkeypatch.setattr(torch, "kthvalue", spy)
    return calls


def test_adversarial_order_falls_back(kthvalue_calls):
    # The strided sample sees only the small values: the bracket misses and the full kthvalue runs.
    n = 400_000
    flat = torch.arange(n, dtype=torch.float32)
    stride = n // fs.KTH_SAMPLE
    flat[::stride] = -1.0
    k = n // 5
    expected = torch.sort(flat, descending=True).values[k - 1]
    assert torch.equal(fs.kth_largest(flat, k), expected)
    assert kthvalue_calls[-1] == n  # fell back to the full selection


def test_bracket_path_is_used_and_small_inputs_go_direct(kthvalue_calls):
    calls = kthvalue_calls
    flat = torch.rand(1_000_000, generator=torch.Generator().manual_seed(2))
    fs.kth_largest(flat, 200_000)
    assert max(calls) < 50_000  # only the sample and the bracket were selected from
    calls.clear()
    small = torch.rand(1000)
    fs.kth_largest(small, 10)
    assert calls == [1000]


@pytest.mark.parametrize("k", [0, -1, 11])
def test_bad_k(k):
    with pytest.raises(ValueError, match="out of range"):
        fs.kth_largest(torch.rand(10), k)


@pytest.mark.parametrize("source", ["estimate", "ema"])
def test_flat_sophia_mask_identical_to_the_kthvalue_rule(source):
    """On a model big enough for the bracketed path the mask is the reference rule's, incl. ties."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(300, 500), (4000,), (50, 50)]]
    opt = FlatSophia(ps, lr=1e-2, sharp_fraction=0.2, dampening_factor=7, mask_source=source)
    d = [torch.randn(p.shape, generator=g) for p in ps]
    d[1][:2000] = d[0].flatten()[0]  # a block of ties
    d[2].zero_()
    assert opt.update_hessian(d)
    src = d if source == "estimate" else [opt.state[p]["hessian"] for p in ps]
    flat = torch.cat([e.flatten() for e in src]).abs()
    k = int(0.2 * flat.numel())
    tau = torch.kthvalue(flat, flat.numel() - k + 1).values
    for p, e in zip(ps, src):
        m = opt.state[p]["mask"]
        assert m.dtype == torch.int8
        assert torch.equal(m, torch.where(e.abs() > tau, 7, 1).to(torch.int8))
