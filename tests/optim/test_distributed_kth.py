"""FlatSophia's distributed threshold: ``distributed_kth_largest`` over 2 gloo ranks equals
``torch.kthvalue`` on the concatenation of the ranks' values (ties, zeros, k=1, k=n, odd splits,
an empty rank), bit for bit. One spawn runs every case."""

from __future__ import annotations

import pytest
import torch

from _spawn import spawn
from flatsophia.optim.flat_sophia import distributed_kth_largest


def _cases():
    """(name, full values, split point of rank 0's part, ks)."""
    g = torch.Generator().manual_seed(0)
    out = []
    x = torch.randn(1001, generator=g).abs_()
    out.append(("randn_odd_split", x, 700, [1, 2, 200, 500, 1000, 1001]))
    out.append(("randn_float64", x.double() * 1e-30, 13, [1, 200, 1001]))
    ties = torch.randint(0, 5, (999,), generator=g).float()
    out.append(("ties", ties, 333, [1, 100, 199, 200, 201, 600, 998, 999]))
    zeros = torch.zeros(301)
    zeros[::50] = 2.0
    out.append(("mostly_zeros", zeros, 150, [1, 6, 7, 60, 301]))
    out.append(("all_zeros", torch.zeros(64), 32, [1, 13, 64]))
    wide = torch.cat([torch.tensor([0.0, float("inf"), 1e-45, 3e38]), torch.rand(96, generator=g)])
    out.append(("inf_subnormal", wide, 1, [1, 2, 3, 4, 50, 100]))
    out.append(("empty_rank", torch.rand(257, generator=g), 0, [1, 51, 257]))
    return out


def _worker(rank, world):
    results = {}
    for name, full, split, ks in _cases():
        part = full[:split] if rank == 0 else full[split:]
        for radix_bits in (8, 1, 5):
            for k in ks:
                results[(name, radix_bits, k)] = distributed_kth_largest(part, k, radix_bits=radix_bits)
    errors = {}
    for label, part, k in (
        ("k0", torch.rand(5), 0),
        ("k_too_big", torch.rand(5), 11),
        ("negative", torch.tensor([1.0, -2.0]) if rank == 1 else torch.rand(3), 1),
        ("nan", torch.tensor([float("nan")]) if rank == 0 else torch.rand(3), 1),
    ):
        try:
            distributed_kth_largest(part, k)
        except ValueError as err:
            errors[label] = str(err)
    return results, errors


@pytest.fixture(scope="module")
def ranks():
    return spawn(_worker)


def test_matches_kthvalue_on_the_concatenation(ranks):
    (r0, _), (r1, _) = ranks
    for name, full, _, ks in _cases():
        for radix_bits in (8, 1, 5):
            for k in ks:
                expected = torch.kthvalue(full, full.numel() - k + 1).values
                got0, got1 = r0[(name, radix_bits, k)], r1[(name, radix_bits, k)]
                assert got0.dtype == full.dtype and got0.shape == ()
                assert torch.equal(got0, expected), (name, radix_bits, k, got0, expected)
                assert torch.equal(got1, expected), (name, radix_bits, k)


def test_errors_raised_on_every_rank(ranks):
    (_, e0), (_, e1) = ranks
    assert e0.keys() == e1.keys() == {"k0", "k_too_big", "negative", "nan"}
    assert "out of range for 10 values" in e0["k_too_big"]
    assert "non-negative and not NaN" in e1["negative"] and "non-negative and not NaN" in e0["nan"]


def test_refuses_other_dtypes_and_radix():
    with pytest.raises(ValueError, match="float32 or float64"):
        distributed_kth_largest(torch.rand(4).half(), 1)
    with pytest.raises(ValueError, match="radix_bits"):
        distributed_kth_largest(torch.rand(4), 1, radix_bits=0)
