"""Estimator and refresher states load on any machine: generator states are keyed by device type, a
state of a device type this machine lacks (a GPU run's "cuda" state on a CPU-only machine) is kept
and written back unchanged, and checkpoints keyed by device ("cuda:0") load too.

The GPU states are built by hand as a GPU run writes them: a CUDA (Philox) generator's
``get_state()`` is 16 bytes, its seed and offset as two int64 (a CPU mt19937 state is 5056 bytes).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.hessian import GaussNewtonBartlett, HessianRefresher, Hutchinson
from flatsophia.optim import SophiaG

pytestmark = pytest.mark.usefixtures("one_thread")


def cuda_state(seed: int, offset: int) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8)


def draws(est, n=5) -> torch.Tensor:
    """Draws from the estimator's CPU stream, through its public estimate (labels or probes)."""
    z = nn.Parameter(torch.zeros(n, 3, dtype=torch.float64))
    if isinstance(est, GaussNewtonBartlett):
        return torch.cat([est(lambda: z, None, [z])[0] for _ in range(2)])
    return torch.cat([est(lambda: z, lambda out: (out**2).sum(), [z])[0] for _ in range(2)])


def round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


ESTIMATORS = [GaussNewtonBartlett, Hutchinson]


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.name)
@pytest.mark.parametrize("key", ["cuda", "cuda:0", "cuda:3"])
def test_gpu_run_state_loads_on_cpu(cls, key):
    """A GPU run's state (its CPU stream and a CUDA one, under the key a GPU run wrote) loads on
    this CPU-only machine: the CPU stream resumes exactly and the CUDA state round-trips untouched."""
    ran = cls(seed=7)
    draws(ran)  # the CPU stream has moved on
    saved = copy.deepcopy(ran.state_dict())
    cuda = cuda_state(7, 4 * 1234)
    saved["generators"][key] = cuda
    resumed = cls(seed=0)
    resumed.load_state_dict(round_trip(saved))
    assert torch.equal(draws(resumed), draws(ran))
    out = round_trip(resumed.state_dict())
    assert set(out["generators"]) == {"cpu", "cuda"}
    assert torch.equal(out["generators"]["cuda"], cuda)
    assert torch.equal(out["generators"]["cpu"], ran.state_dict()["generators"]["cpu"])
    again = cls(seed=0)
    again.load_state_dict(out)  # and once more: the kept state loads as any other
    assert torch.equal(again.state_dict()["generators"]["cuda"], cuda)


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.name)
def test_cuda_only_state_on_cpu_starts_the_cpu_stream_from_the_seed(cls):
    """A state with no CPU stream (a GPU run that drew on the GPU only): the CPU stream starts from
    the checkpoint's seed, as on a fresh estimator; the CUDA state is kept."""
    state = {"name": cls.name, "seed": 11, "generators": {"cuda:0": cuda_state(11, 8)}}
    resumed = cls(seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(draws(resumed), draws(cls(seed=11)))
    assert torch.equal(resumed.state_dict()["generators"]["cuda"], cuda_state(11, 8))


def test_states_of_several_indices_keep_the_lowest():
    state = {"name": "gnb", "seed": 1, "generators": {"cuda:1": cuda_state(1, 40), "cuda:0": cuda_state(1, 80)}}
    est = GaussNewtonBartlett()
    est.load_state_dict(state)
    assert set(est.state_dict()["generators"]) == {"cuda"}
    assert torch.equal(est.state_dict()["generators"]["cuda"], cuda_state(1, 80))


def test_an_unused_cpu_state_is_kept_too():
    """The reverse direction's bookkeeping: a CPU run's state, loaded where the estimator would draw
    on another device type, is written back unchanged until the CPU stream is used."""
    ran = GaussNewtonBartlett(seed=2)
    draws(ran)
    est = GaussNewtonBartlett()
    est.load_state_dict(ran.state_dict())
    assert torch.equal(est.state_dict()["generators"]["cpu"], ran.state_dict()["generators"]["cpu"])


@pytest.mark.parametrize(
    "generators, match",
    [
        ({"gpu0": cuda_state(0, 0)}, "'gpu0' is not a device"),
        ({"cuda": torch.zeros(16)}, "'cuda'.*uint8"),
        ({"cuda": [0] * 16}, "'cuda'.*uint8"),
        ({"cpu": cuda_state(0, 0)}, "'cpu'"),  # a CUDA state under the CPU key
        ([], "generators"),
    ],
    ids=["key", "dtype", "list", "cpu-size", "not-a-dict"],
)
def test_bad_states_raise_before_anything_changes(generators, match):
    est = GaussNewtonBartlett(seed=3)
    draws(est)
    before = copy.deepcopy(est.state_dict())
    with pytest.raises(ValueError, match=match):
        est.load_state_dict({"name": "gnb", "seed": 9, "generators": generators})
    after = est.state_dict()
    assert after["seed"] == 3 and torch.equal(after["generators"]["cpu"], before["generators"]["cpu"])


def test_refresher_state_from_a_gpu_run_loads_on_cpu():
    """The template's checkpoint path: a refresher state whose estimator drew on "cuda:0" resumes
    on a CPU-only machine (its schedule stream and counters exactly) and writes the CUDA state back."""

    def refresher():
        torch.manual_seed(0)
        net = nn.Linear(4, 3)
        return net, HessianRefresher(SophiaG(net.parameters()), every_k=1, refresh_prob=0.5, seed=4)

    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    net, ran = refresher()
    for step in range(3):
        ran.maybe_refresh(step, lambda: net(x), lambda out: F.cross_entropy(out, y))
    saved = copy.deepcopy(ran.state_dict())
    saved["estimator"]["generators"]["cuda:0"] = cuda_state(4, 12)
    net2, resumed = refresher()
    resumed.load_state_dict(round_trip(saved))
    assert (resumed.refreshes, resumed.skipped) == (ran.refreshes, ran.skipped)
    for step in range(3, 8):
        assert resumed.due(step) == ran.due(step)
    assert torch.equal(draws(resumed.estimator), draws(ran.estimator))
    assert torch.equal(resumed.state_dict()["estimator"]["generators"]["cuda"], cuda_state(4, 12))
