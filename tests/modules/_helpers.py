"""Small builders shared by the module tests: a tiny classifier, data and a state dump callback."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flatsophia.hessian import GaussNewtonBartlett
from flatsophia.modules import OptimLitModule
from flatsophia.optim import get_spec

#: Per-optimizer settings that move a tiny model noticeably in a few steps.
OPT_KWARGS = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "sophia_g": dict(lr=1e-2, rho=0.05, weight_decay=0.1),
    "sophia_h": dict(lr=1e-2, weight_decay=0.1),
    "flat_sophia": dict(lr=1e-2, weight_decay=0.1, sharp_fraction=0.2),
    "soap": dict(lr=1e-2, precondition_frequency=2),
}

#: The identity tests' settings (DDP, FSDP, resume): most coordinates' updates are not clipped, so
#: the Hessian estimates reach the parameters (with OPT_KWARGS nearly all are clipped here): a
#: large gamma (rho), and a floor eps under which the negative Hutchinson estimates' |u| stays
#: below the clip. ``make_module(..., unclipped=True)``; DumpState records the unclipped fraction.
UNCLIPPED = {
    "sophia_g": dict(rho=500),
    "sophia_h": dict(gamma=1000, eps=0.1),
    "flat_sophia": dict(gamma=1000, eps=0.1),
}


def dataset(
    n: int = 64, nan_batch: int | None = None, batch_size: int = 8, seed: int = 0, dtype=torch.float32
) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    if nan_batch is not None:
        x[nan_batch * batch_size] = float("nan")
    return TensorDataset(x, y)


def make_module(
    name: str, seed: int = 0, dtype=torch.float32, unclipped: bool = False, **module_kwargs
) -> OptimLitModule:
    """The tiny classifier's module; ``unclipped``: the :data:`UNCLIPPED` settings, and statistics
    (the unclipped fraction) collected at every step."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    kwargs = {**OPT_KWARGS[name], **(UNCLIPPED.get(name, {}) if unclipped else {})}
    if unclipped:
        module_kwargs.setdefault("log_stats_every", 1)
    factory = functools.partial(get_spec(name).cls, **kwargs)
    module_kwargs.setdefault("scheduler", {"name": "constant"})
    module_kwargs.setdefault("hessian", {"every_k": 3})
    return OptimLitModule(net, factory, num_classes=3, optimizer_name=name, **module_kwargs)


def trainer(tmp_path: Path, callbacks=(), **kwargs) -> L.Trainer:
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return L.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
        **kwargs,
    )


def loader(ds, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


class RecordWinRates(L.Callback):
    """Records the unclipped fraction (``win_rate``) after every step that collected statistics."""

    def __init__(self):
        self.win_rates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stats = trainer.optimizers[0].stats() if hasattr(trainer.optimizers[0], "stats") else {}
        if "win_rate" in stats:
            self.win_rates.append(stats["win_rate"].item())


def sum_as_ranks(net: nn.Module, world: int = 2) -> nn.Module:
    """Make one process sum as ``world`` data-parallel ranks reading :class:`InterleavedSampler`'s
    rows do: each rank's rows (r, r + world, ...) go through ``net`` on their own. With a mean loss
    each part's gradient is then a rank's own divided by ``world`` (exact for a power of two), and
    autograd adds the parts as the ranks' reduction adds their pre-divided gradients."""
    forward = net.forward

    def by_rank(x):
        out = [forward(x[r::world].contiguous()) for r in range(world)]  # as a rank's own batch
        full = out[0].new_empty((x.shape[0], *out[0].shape[1:]))
        for r, o in enumerate(out):
            full[r::world] = o
        return full

    net.forward = by_rank
    return net


class DumpState(RecordWinRates):
    """Writes every rank's parameters and optimizer state to ``out/rank{r}.pt`` at the end of fit,
    with the unclipped fraction (``win_rate``) of every step that collected statistics."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "optim": trainer.optimizers[0].state_dict(),
                "refreshes": pl_module.hessian_refreshes,
                "global_step": trainer.global_step,
                "win_rates": self.win_rates,
            },
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


def flatten_state(obj, prefix: str = "") -> dict[str, object]:
    """Nested dict/list of an optimizer state_dict -> {path: leaf} for comparisons."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten_state(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten_state(v, f"{prefix}/{i}"))
    else:
        out[prefix] = obj
    return out


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between matching tensor leaves of two flattened dicts."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, k
            if x.numel():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
        else:
            assert x == y, (k, x, y)
    return worst


class ArgmaxGNB(GaussNewtonBartlett):
    """GNB with deterministic labels (argmax), so 2x4 and 1x8 batch layouts see the same labels.

    Sampled labels equal a single process's draw over the ranks' batches concatenated in rank order
    (tests/hessian/test_gnb_ranks.py); these tests lay the global batch out interleaved (rank r reads
    examples r, r + 2, ...), so labels are made deterministic: the estimate is then a mean over examples.
    """

    def sample_labels(self, probs):
        return probs.argmax(dim=-1)


class ArgmaxGNBModule(OptimLitModule):
    """The module with :class:`ArgmaxGNB` in place of the sampled-label estimator."""

    def configure_optimizers(self):
        out = super().configure_optimizers()
        if self.estimator_name == "gnb":
            self.refresher.estimator = ArgmaxGNB(seed=0)
        return out


class InterleavedSampler(torch.utils.data.Sampler):
    """Rank r reads examples r, r + world, r + 2 world, ... in order (the single process reads them all)."""

    def __init__(self, n: int):
        self.n = n

    def _layout(self):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._layout()
        return iter(range(rank, self.n, world))

    def __len__(self):
        return self.n // self._layout()[1]


class BlockSampler(InterleavedSampler):
    """Rank r reads the r-th block of ``batch`` examples of each global batch of ``batch x world``:
    the global batch is the ranks' batches concatenated in rank order (the single process reads all)."""

    def __init__(self, n: int, batch: int):
        super().__init__(n)
        self.batch = batch

    def __iter__(self):
        rank, world = self._layout()
        step = self.batch * world
        return iter(
            i
            for start in range(0, self.n, step)
            for i in range(start + rank * self.batch, start + (rank + 1) * self.batch)
        )
