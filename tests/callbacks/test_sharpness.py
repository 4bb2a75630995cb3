"""SharpnessCallback / hessian_top_eig_and_trace: exact values on tiny models, logging steps, no side effects."""

from __future__ import annotations

import functools
import math
import random

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from flatsophia.callbacks import SharpnessCallback, hessian_top_eig_and_trace
from flatsophia.modules import OptimLitModule
from flatsophia.optim import get_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=48, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64).to(dtype)
    y = ((x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()).clamp(max=2)
    return x, y


def _exact_hessian(net: nn.Module, x, y) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def f(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            k = shape.numel()
            params[name] = flat[offset : offset + k].view(shape)
            offset += k
        return F.cross_entropy(functional_call(net, params, (x,)), y)

    return hessian(f)(flat0)


def _nets():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3).double()  # softmax regression: convex, PSD Hessian
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # indefinite Hessian
    return {"linear": linear, "mlp": mlp}


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_top_eig_matches_eigvalsh(kind):
    net = _nets()[kind]
    x, y = _data()
    ev = torch.linalg.eigvalsh(_exact_hessian(net, x, y))
    expected = ev[-1].item()  # lambda_max
    assert expected == ev[ev.abs().argmax()].item()  # here also the eigenvalue of largest magnitude
    top, _ = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=200, n_hutchinson=1)
    assert top == pytest.approx(expected, rel=1e-3), (top, ev)
    # The default 20 iterations: the Rayleigh quotient of a PSD Hessian approaches the top eigenvalue
    # from below (the linear model's two top eigenvalues are within 10%, so it is not there yet);
    # with a clear gap (the MLP) it has converged.
    top, _ = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=20, n_hutchinson=1)
    if kind == "linear":
        assert 0.95 * expected < top <= expected + 1e-12
    else:
        assert top == pytest.approx(expected, rel=1e-3), (top, ev)
    top, _ = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=500, n_hutchinson=1, tol=1e-12)
    assert top == pytest.approx(expected, rel=1e-8)


class _Quadratic(nn.Module):
    """``forward`` returns the parameter; with ``loss_fn = 0.5 theta^T A theta`` the Hessian is A."""

    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))

    def forward(self, x):
        return self.theta


def test_top_eig_with_a_dominant_negative_eigenvalue():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    eigs = torch.tensor([-5.0, -1.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    a = q @ torch.diag(eigs) @ q.T
    net = _Quadratic(6)
    loss_fn = lambda out, y: 0.5 * out @ a @ out
    assert torch.allclose(_hessian_of(net, loss_fn), a)
    top, trace = hessian_top_eig_and_trace(net, loss_fn, None, None, n_power_iters=200, n_hutchinson=2000)
    assert top == pytest.approx(3.0, rel=1e-3)  # lambda_max, not the -5 of largest magnitude
    var = 2 * ((a**2).sum() - (a.diagonal() ** 2).sum()).item()
    assert abs(trace - eigs.sum().item()) <= 4 * math.sqrt(var / 2000)
    top, _ = hessian_top_eig_and_trace(net, loss_fn, None, None, n_power_iters=1000, n_hutchinson=0, tol=1e-13)
    assert top == pytest.approx(3.0, rel=1e-6)


def _hessian_of(net, loss_fn):
    theta = net.theta.detach().clone()
    return hessian(lambda t: loss_fn(functional_call(net, {"theta": t}, (None,)), None))(theta)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_trace_within_statistical_tolerance(kind):
    net = _nets()[kind]
    x, y = _data()
    h = _exact_hessian(net, x, y)
    exact = h.trace().item()
    # Rademacher Hutchinson: Var(v^T H v) = 2 * sum_{i != j} H_ij^2 per probe.
    var = 2 * ((h**2).sum() - (h.diagonal() ** 2).sum()).item()
    for n in (10, 400):
        _, trace = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=0, n_hutchinson=n)
        assert abs(trace - exact) <= 4 * math.sqrt(var / n), (n, trace, exact)
    # the trace is a sum of eigenvalues, the top one is among them
    assert exact == pytest.approx(torch.linalg.eigvalsh(h).sum().item())


def test_no_side_effects_and_deterministic():
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double()
    net.train()
    net[1].eval()  # a mixed state must come back as it was
    net[0].weight.grad = torch.ones_like(net[0].weight)
    x, y = _data()
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    first = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=5, n_hutchinson=3, seed=7)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "0.weight")
    again = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=5, n_hutchinson=3, seed=7)
    assert again == first
    other = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=5, n_hutchinson=3, seed=8)
    assert other != first
    top, trace = hessian_top_eig_and_trace(net, F.cross_entropy, x, y, n_power_iters=0, n_hutchinson=2)
    assert math.isnan(top) and math.isfinite(trace)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="n_power_iters"):
        hessian_top_eig_and_trace(nn.Linear(4, 3), F.cross_entropy, *_data(dtype=torch.float32), n_power_iters=-1)
    with pytest.raises(ValueError, match="every_n_steps"):
        SharpnessCallback(every_n_steps=-1)
    with pytest.raises(ValueError, match="batch_size"):
        SharpnessCallback(batch_size=0)
    with pytest.raises(ValueError, match="both 0"):
        SharpnessCallback(n_power_iters=0, n_hutchinson=0)


# ---------------------------------------------------------------- Lightning
class _DataModule(L.LightningDataModule):
    def __init__(self, batch_size=8, shuffle=False):
        super().__init__()
        self.batch_size, self.shuffle = batch_size, shuffle

    def setup(self, stage=None):
        x, y = _data(64, seed=0, dtype=torch.float32)
        self.train = TensorDataset(x[:48], y[:48])
        self.val = TensorDataset(x[48:], y[48:])

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size)


def _module(name="sophia_h", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(dropout), nn.Tanh(), nn.Linear(8, 3))
    factory = functools.partial(get_spec(name).cls, lr=1e-2, weight_decay=0.1)
    return OptimLitModule(
        net, factory, num_classes=3, optimizer_name=name, scheduler={"name": "constant"}, hessian={"every_k": 2}
    )


def _trainer(tmp_path, callbacks=(), logger=False, validate=False, **kwargs):
    return L.Trainer(
        default_root_dir=tmp_path,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=2 if validate else 0,
        limit_val_batches=None if validate else 0,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        **kwargs,
    )


def test_callback_logs_at_the_right_steps(tmp_path):
    cb = SharpnessCallback(every_n_steps=3, n_power_iters=10, n_hutchinson=4, batch_size=10)
    logger = CSVLogger(tmp_path, name="csv")
    module = _module()
    trainer = _trainer(tmp_path, [cb], logger=logger, max_steps=7, log_every_n_steps=1)
    trainer.fit(module, datamodule=_DataModule())
    assert [h["step"] for h in cb.history] == [3, 6, 7]  # every 3 optimizer steps, and at train end
    assert cb.batch[0].shape == (10, 4)  # first 10 validation examples (two loader batches, truncated)
    dm = _DataModule()
    dm.setup()
    assert torch.equal(cb.batch[0], dm.val.tensors[0][:10])
    metrics = pd.read_csv(next(tmp_path.glob("csv/version_*/metrics.csv")))
    rows = metrics.dropna(subset=["sharpness/top_eig"])
    assert rows["step"].tolist() == [3, 6, 7]
    assert rows["sharpness/trace"].notna().all()
    # the logged value is the value on the fixed batch with the final weights
    final = hessian_top_eig_and_trace(module.net, module.loss_fn, *cb.batch, n_power_iters=10, n_hutchinson=4)
    assert rows["sharpness/top_eig"].iloc[-1] == pytest.approx(final[0], rel=1e-6)
    assert rows["sharpness/trace"].iloc[-1] == pytest.approx(final[1], rel=1e-6)
    assert trainer.callback_metrics["sharpness/top_eig"].item() == pytest.approx(final[0], rel=1e-6)


def test_callback_on_validation_and_explicit_batch(tmp_path):
    x, y = _data(20, seed=5, dtype=torch.float32)
    cb = SharpnessCallback(every_n_steps=0, n_power_iters=3, n_hutchinson=2, batch=(x, y), on_validation=True)
    trainer = _trainer(tmp_path, [cb], validate=True, max_epochs=2)
    trainer.fit(_module(), datamodule=_DataModule())
    # 6 optimizer steps per epoch; one measurement per validation run (not the sanity check), none at
    # train end because step 12 was already measured after the last validation
    assert [h["step"] for h in cb.history] == [6, 12]
    assert torch.equal(cb.batch[0], x[:256])


def test_callback_without_validation_loader_raises(tmp_path):
    x, y = _data(16, dtype=torch.float32)
    trainer = _trainer(tmp_path, [SharpnessCallback(every_n_steps=1)], max_steps=1)
    with pytest.raises(ValueError, match="no validation dataloader"):
        trainer.fit(_module(), train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=8))


class _ConsumesRng(L.Callback):
    """A deliberately bad callback: draws from the global RNG (to check the test below can see it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(1)


def _fit_params(tmp_path, callbacks):
    module = _module("flat_sophia", dropout=0.3, seed=0)
    trainer = _trainer(tmp_path, callbacks, validate=True, max_epochs=2)
    L.seed_everything(0, workers=True)
    trainer.fit(module, datamodule=_DataModule(shuffle=True))
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def test_training_trajectory_is_unchanged(tmp_path):
    base = _fit_params(tmp_path / "a", [])
    with_cb = _fit_params(
        tmp_path / "b", [SharpnessCallback(every_n_steps=2, n_power_iters=3, n_hutchinson=2, on_validation=True)]
    )
    assert base.keys() == with_cb.keys()
    for k in base:
        assert torch.equal(base[k], with_cb[k]), k
    # the comparison is sensitive: one extra draw from the global RNG (dropout, shuffling) shows
    bad = _fit_params(tmp_path / "c", [_ConsumesRng()])
    assert any(not torch.equal(base[k], bad[k]) for k in base)


def test_fixed_batch_from_a_loader_with_workers():
    from flatsophia.callbacks.sharpness import _take_examples

    ds = TensorDataset(torch.arange(20.0).view(10, 2), torch.arange(10))
    x, y = _take_examples(DataLoader(ds, batch_size=3, num_workers=2, persistent_workers=True), 7)
    assert torch.equal(y, torch.arange(7)) and x.shape == (7, 2)
    x, y = _take_examples(DataLoader(ds, batch_size=3), None)  # None: the first batch as it is
    assert torch.equal(y, torch.arange(3))
