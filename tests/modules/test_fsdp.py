"""FSDP2 through Lightning: ``ModelParallelStrategy`` on 2 CPU processes (gloo), the module sharding
its network in ``configure_model``. The sharded run equals a single-process run over the same
global batch (parameters and FlatSophia's masks) bit for bit: the single process sums as the ranks
do (:func:`~_helpers.sum_as_ranks`), and the settings leave most updates unclipped, so the Hessian
estimates reach the parameters.

Lightning starts the ranks of this strategy by re-running the command; here the 2 processes are
spawned by the test with a launcher's environment (LOCAL_RANK, ...), which Lightning joins.
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from _helpers import ArgmaxGNBModule, InterleavedSampler, RecordWinRates, dataset, make_module, sum_as_ranks, trainer

from _spawn import spawn
from conftest import run_script

STEPS = 7  # every_k=3: refreshes at steps 0, 3 and 6
#: (optimizer, hessian block, dtype): the finite difference in float64, where a step eps off by
#: 1e-9 relative shows (in float32 it would be no change: eps is rounded to float32 where used).
CASES = [
    ("sophia_g", {"every_k": 3}, torch.float32),
    ("sophia_h", {"every_k": 3, "hvp": "finite_difference"}, torch.float64),
    ("flat_sophia", {"every_k": 3, "hvp": "finite_difference"}, torch.float64),
]


class Dump(RecordWinRates):
    """Whole parameters and masks at the end of fit (``full_tensor`` gathers: test only), and the
    unclipped fraction of every step."""

    def on_train_end(self, trainer, pl_module):
        def full(t):
            return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

        opt = trainer.optimizers[0]
        self.out = {
            "params": {n: full(p) for n, p in pl_module.named_parameters()},
            "masks": {n: full(opt.state[p]["mask"]) for n, p in pl_module.named_parameters() if "mask" in opt.state[p]},
            "sharded": type(next(pl_module.parameters())).__name__,
            "refreshes": pl_module.hessian_refreshes,
            "global_step": trainer.global_step,
            "reduce": pl_module.refresher.reduce,
            "win_rates": self.win_rates,
        }


def _fit(tmp: Path, name, hessian, dtype, devices, batch_size, strategy="auto", n=64, epochs=None, save=False, **fit):
    module = make_module(name, dtype=dtype, hessian=hessian, unclipped=True)
    module.__class__ = ArgmaxGNBModule
    if devices == 1:
        sum_as_ranks(module.net)
    callbacks = [Dump()]
    if save:  # last.ckpt, with this strategy a folder written by torch.distributed.checkpoint
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, save_last=True, save_top_k=0))
    length = dict(max_epochs=epochs, max_steps=-1) if epochs else dict(max_steps=STEPS)
    t = trainer(tmp, callbacks=callbacks, devices=devices, strategy=strategy, use_distributed_sampler=False, **length)
    data = torch.utils.data.DataLoader(dataset(n=n, dtype=dtype), batch_size=batch_size, sampler=InterleavedSampler(n))
    t.fit(module, data, **fit)
    return callbacks[0].out


def _worker(rank, world, root):
    from lightning.pytorch.strategies import ModelParallelStrategy

    def strategy():
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)

    out = {}
    for name, hessian, dtype in CASES:
        out[name] = _fit(Path(root) / name, name, hessian, dtype, world, 4, strategy())
    # 2 epochs of 4 steps (32 examples), or 1, Lightning's sharded checkpoint, and 1 more.
    name, hessian, dtype = CASES[-1]
    tmp = Path(root) / "resume"
    out["whole"] = _fit(tmp / "whole", name, hessian, dtype, world, 4, strategy(), n=32, epochs=2)
    _fit(tmp, name, hessian, dtype, world, 4, strategy(), n=32, epochs=1, save=True)
    out["resumed"] = _fit(tmp, name, hessian, dtype, world, 4, strategy(), n=32, epochs=2, ckpt_path=tmp / "last.ckpt")
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return spawn(_worker, str(tmp_path_factory.mktemp("fsdp")), lightning=True)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "hessian", "dtype"), CASES, ids=[c[0] for c in CASES])
def test_fsdp_matches_single_process(sharded, tmp_path, name, hessian, dtype):
    r0, r1 = sharded[0][name], sharded[1][name]
    for r in (r0, r1):
        assert r["sharded"] == "DTensor" and r["reduce"] is None  # FSDP averaged the estimates
        assert r["global_step"] == STEPS and r["refreshes"] == 3
    single = _fit(tmp_path, name, hessian, dtype, devices=1, batch_size=8)
    print(f"{name}: unclipped fraction {min(single['win_rates']):.2f}-{max(single['win_rates']):.2f}")
    assert len(single["win_rates"]) == STEPS and min(single["win_rates"]) > 0.5
    assert r0["win_rates"] == r1["win_rates"] == single["win_rates"]
    for key, p in r0["params"].items():
        assert torch.equal(p, r1["params"][key])  # the gathered whole is the same on both ranks
        diff = (p - single["params"][key]).abs().max().item()
        assert diff == 0, f"{name}: FSDP vs single-process max |param diff| = {diff:.3g} ({key})"
    if name == "flat_sophia":
        assert r0["masks"].keys() == single["masks"].keys() and r0["masks"]
        for key, m in r0["masks"].items():
            assert torch.equal(m, single["masks"][key]), key
        assert any((m != 1).any() for m in r0["masks"].values())


@pytest.mark.slow
def test_fsdp_resume_from_distributed_checkpoint_is_exact(sharded):
    """FlatSophia (hvp=finite_difference): 4 steps, Lightning's sharded checkpoint (optimizer state
    through torch.distributed.checkpoint, the refresher's generators in its metadata), 4 more
    steps: bit-identical to 8 steps in one go."""
    for rank in sharded:
        whole, resumed = rank["whole"], rank["resumed"]
        assert resumed["global_step"] == whole["global_step"] == 8
        assert resumed["refreshes"] == whole["refreshes"] == 3
        for key, p in whole["params"].items():
            assert torch.equal(p, resumed["params"][key]), key
        for key, m in whole["masks"].items():
            assert torch.equal(m, resumed["masks"][key]), key


@pytest.mark.slow
def test_cli_trainer_fsdp_sim(tmp_path, data_dir):
    """``python src/train.py trainer=fsdp_sim``: Lightning re-runs the command for rank 1, the ViT1D's
    blocks and root are sharded, FlatSophia refreshes with the finite difference, checkpoints are
    written by torch.distributed.checkpoint and the best one is tested."""
    over = [
        "trainer=fsdp_sim",
        "optimizer=flat_sophia",
        "hessian.hvp=finite_difference",
        "hessian.every_k=2",
        "optimizer.sharp_fraction=0.2",
        "module.log_stats_every=2",
        "data.num_samples=1000",
        "data.n_val=200",
        "data.batch_size=16",
        "model.embed_dim=16",
        "model.depth=2",
        "model.num_heads=2",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0",
        "++trainer.limit_train_batches=5",
        "++trainer.limit_val_batches=2",
        "++trainer.limit_test_batches=2",
        "logger=csv",
    ]
    result = run_script("train", *over, log_dir=tmp_path, data_dir=data_dir)
    assert "Final metrics:" in result.stdout
    (ckpt,) = tmp_path.glob("train/runs/*/checkpoints/last.ckpt")
    assert ckpt.is_dir()  # a sharded checkpoint
    rows = list(csv.DictReader(next(tmp_path.glob("train/runs/*/csv/version_0/metrics.csv")).open()))
    masked = [float(r["optim/masked_frac"]) for r in rows if r.get("optim/masked_frac")]
    refreshes = [float(r["optim/hessian_refreshes"]) for r in rows if r.get("optim/hessian_refreshes")]
    assert masked and 0 < masked[-1] < 0.2 and refreshes[-1] == 2  # by step 3: steps 0 and 2
