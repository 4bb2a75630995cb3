"""The optimizers on parameters sharded by FSDP2 (DTensors, 2 gloo ranks): each rank updates only its
shards, and the result is bit-identical to one process stepping the whole parameters.

Gradients and Hessian estimates are synthetic (full-size draws from a seeded generator, of which
each rank keeps its shard), so the sharded and the single-process steps see the same values and
must agree exactly: the step, the Hessian EMA, FlatSophia's global mask (threshold by
``distributed_kth_largest``) and the statistics, for both kernels, also with bf16 parameters (float32
state on the shards). One spawn runs every case.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _spawn import spawn
from flatsophia.optim import FlatSophia, SophiaG, SophiaH
from flatsophia.sharding import local_shard, wrap_like

STEPS = 6
#: Settings where most updates are not clipped (measured: at least 91% of the coordinates at every
#: step with stats; the test checks more than half), so the Hessian EMA reaches the parameters:
#: a large gamma (rho), and a floor eps under which the negative estimates' |u| stays below the clip.
UNCLIPPED = dict(gamma=1000, eps=1.0)
CASES = {
    "sophia_g": (SophiaG, dict(lr=1e-2, rho=50, weight_decay=0.1, bs=8)),
    "sophia_h": (SophiaH, dict(lr=1e-2, weight_decay=0.1, **UNCLIPPED)),
    "flat_sophia": (FlatSophia, dict(lr=1e-2, weight_decay=0.1, sharp_fraction=0.3, **UNCLIPPED)),
    "flat_sophia_ema": (FlatSophia, dict(lr=1e-2, sharp_fraction=0.25, mask_source="ema", **UNCLIPPED)),
    "flat_sophia_random": (
        FlatSophia,
        dict(lr=1e-2, sharp_fraction=0.5, mask_source="random", mask_seed=3, **UNCLIPPED),
    ),
    "sophia_g_bf16": (SophiaG, dict(lr=1e-2, rho=50, weight_decay=0.1, bs=8)),
    "flat_sophia_bf16": (FlatSophia, dict(lr=1e-2, weight_decay=0.1, sharp_fraction=0.3, **UNCLIPPED)),
}
#: The parameters' dtype of a case (float32 unless its name says bf16).
DTYPES = {name: torch.bfloat16 if name.endswith("_bf16") else torch.float32 for name in CASES}


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    # odd sizes: uneven shards (5 rows -> 3 + 2, the bias of 3 -> 2 + 1), and empty ones (1 row -> 1 + 0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def _draws(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _comms(counts: dict) -> dict[str, int]:
    return {str(op).split("'")[1] if "'" in str(op) else str(op): n for op, n in counts.items() if n}


def _run(cls, kwargs, params, sharded, foreach, nan_at=None):
    """STEPS steps with synthetic gradients; a Hessian estimate every other step (the NaN one skipped).
    Also returns the collectives each update_hessian and step issued (sharded: counted by CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode

    opt = cls(params, foreach=foreach, **kwargs)
    accepted, stats, comms = [], [], []
    for step in range(STEPS):
        for p, g in zip(params, _draws(params, 100 + step)):
            p.grad = wrap_like(local_shard(g, p), p) if sharded else g
        if step % 2 == 0:
            est = [e.abs_() if cls is SophiaH else e for e in _draws(params, 200 + step)]
            if step == nan_at:  # a NaN in one coordinate: one rank's shard only when sharded
                est[0][-1, -1] = float("nan")
            est = [wrap_like(local_shard(e, p), p) for e, p in zip(est, params)] if sharded else est
            with warnings.catch_warnings(record=True), CommDebugMode() as comm:
                warnings.simplefilter("always")
                accepted.append(opt.update_hessian(est))
            comms.append(("update_hessian", _comms(comm.get_comm_counts())))
        with CommDebugMode() as comm:
            opt.step(collect_stats=step % 3 == 2)
        comms.append(("step", _comms(comm.get_comm_counts())))
        stats.append({k: v.item() for k, v in opt.stats().items()})
    state = {
        f"{i}/{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
        for i, p in enumerate(params)
        for k, v in opt.state[p].items()
    }
    full = [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in params]
    return full, state, accepted, stats, comms


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, (cls, kwargs) in CASES.items():
        for foreach in (False, True):
            for nan_at in (None, 2):
                ref = list(_net(DTYPES[name]).parameters())
                net = _net(DTYPES[name])
                fully_shard(net, mesh=mesh)
                sharded = list(net.parameters())
                out[(name, foreach, nan_at)] = (
                    _run(cls, kwargs, sharded, True, foreach, nan_at),
                    _run(cls, kwargs, copy.deepcopy(ref), False, foreach, nan_at),
                    [tuple(p.to_local().shape) for p in sharded],
                )
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_worker)


def test_shards_are_uneven(ranks):
    shapes0, shapes1 = ranks[0][("sophia_h", False, None)][2], ranks[1][("sophia_h", False, None)][2]
    assert shapes0[0] == (3, 6) and shapes1[0] == (2, 6) and shapes0[1] == (3,) and shapes1[1] == (2,)
    assert shapes0[4] == (1, 3) and shapes1[4] == (0, 3) and shapes0[5] == (1,) and shapes1[5] == (0,)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_sharded_step_equals_single_process(ranks, name, foreach):
    for rank in ranks:
        (params, state, accepted, stats, _), (ref_params, ref_state, ref_accepted, ref_stats, _), _ = rank[
            (name, foreach, None)
        ]
        for p, r in zip(params, ref_params):
            assert torch.equal(p, r), name
        assert state.keys() == ref_state.keys()
        for key in state:
            assert torch.equal(state[key], ref_state[key]), key
        assert accepted == ref_accepted == [True] * 3
        for got, want in zip(stats, ref_stats, strict=True):  # sums in another order: float32 rounding
            assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
        if DTYPES[name] is torch.bfloat16:
            assert params[0].dtype is torch.bfloat16 and state["0/hessian"].dtype is torch.float32
        win_rates = [s["win_rate"] for s in stats[2:]]
        print(f"{name}: unclipped fraction {min(win_rates):.2f}-{max(win_rates):.2f}")
        assert min(win_rates) > 0.5
        if name.startswith("flat_sophia"):
            assert any((m != 1).any() for k, m in state.items() if k.endswith("/mask"))
            assert 0 < stats[-1]["masked_frac"] < 1


@pytest.mark.parametrize("name", ["sophia_g", "flat_sophia"])
def test_nonfinite_estimate_skipped_on_every_rank(ranks, name):
    for rank in ranks:
        (params, state, accepted, *_), (ref_params, ref_state, ref_accepted, *_), _ = rank[(name, False, 2)]
        assert accepted == ref_accepted == [True, False, True]
        for p, r in zip(params, ref_params):
            assert torch.equal(p, r)
        for key in state:
            assert torch.equal(state[key], ref_state[key]), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_collectives_are_scalar_all_reduces_only(ranks, name):
    """No gather: a step issues no collective (one all-reduce of two sums when it collects stats),
    update_hessian one all-reduce of the non-finite flag, plus FlatSophia's 4 threshold rounds."""
    comms = ranks[0][(name, True, None)][0][4]
    per_refresh = 5 if name.startswith("flat_sophia") else 1
    for what, counts in comms:
        assert set(counts) <= {"c10d.allreduce_"}, (what, counts)
    assert [c.get("c10d.allreduce_", 0) for what, c in comms if what == "update_hessian"] == [per_refresh] * 3
    assert [c.get("c10d.allreduce_", 0) for what, c in comms if what == "step"] == [0, 0, 1, 0, 0, 1]
