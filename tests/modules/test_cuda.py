"""GPU checks (skipped without CUDA): no host-device sync in the step, CPU/GPU agreement, bf16 training.

Run on a GPU machine with ``python -m pytest -q tests/modules/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import dataset, make_module, trainer
from torch import nn
from torch.utils.data import DataLoader

from flatsophia.optim import FlatSophia, SophiaG, SophiaH

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SOPHIA = {
    "sophia_g": (SophiaG, dict(lr=1e-2, rho=0.05, weight_decay=0.1)),
    "sophia_h": (SophiaH, dict(lr=1e-2, weight_decay=0.1)),
    "flat_sophia": (FlatSophia, dict(lr=1e-2, weight_decay=0.1, sharp_fraction=0.2)),
}


def _model(device, dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).to(
        device=device, dtype=dtype
    )


def _fill(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """Deterministic gradients (set on the parameters) and Hessian estimates (returned), made on the CPU."""
    g = torch.Generator().manual_seed(seed)
    estimates = []
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p)
        estimates.append((torch.randn(p.shape, generator=g, dtype=torch.float64).abs() * 0.1).to(p))
    return estimates


@pytest.mark.parametrize("form", ["multi", "single", "compiled"])
@pytest.mark.parametrize("name", list(SOPHIA))
def test_step_does_not_synchronise_with_the_host(name, form):
    """Multi-tensor (the CUDA default), single-tensor and ``torch.compile(opt.step)`` steps."""
    cls, kwargs = SOPHIA[name]
    model = _model("cuda")
    opt = cls(model.parameters(), foreach=form != "single", **kwargs)
    step = torch.compile(opt.step) if form == "compiled" else opt.step
    opt.update_hessian(_fill(model, 0))
    for _ in range(3):  # warm-up: state creation, compilation
        step()
    # New gradients, made before the check (a host-to-device copy synchronises by itself).
    grads = []
    for seed in range(1, 4):
        _fill(model, seed)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, new in enumerate(grads):
            for p, g in zip(model.parameters(), new):
                p.grad.copy_(g)  # device to device: no sync
            if form == "compiled":  # a float lr change would recompile: keep it constant here
                step()
            else:
                opt.param_groups[0]["lr"] = kwargs["lr"] * (1 - i / 10)  # a schedule: new hyperparameters
                step()
                step(collect_stats=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", list(SOPHIA))
def test_gpu_steps_match_cpu_steps_in_float64(name):
    cls, kwargs = SOPHIA[name]
    cpu = _model("cpu", torch.float64)
    gpu = copy.deepcopy(cpu).cuda()
    opts = [cls(m.parameters(), **kwargs) for m in (cpu, gpu)]
    for step in range(8):
        for model, opt in zip((cpu, gpu), opts):
            estimates = _fill(model, step)
            if step % 3 == 0:
                opt.update_hessian(estimates)
            opt.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=1e-12)
    if name == "flat_sophia":
        for pa, pb in zip(cpu.parameters(), gpu.parameters()):
            assert torch.equal(opts[0].state[pa]["mask"], opts[1].state[pb]["mask"].cpu())


@pytest.mark.parametrize("name", list(SOPHIA))
def test_gpu_step_forms_agree(name):
    """Multi-tensor (the CUDA default), single-tensor and ``torch.compile(opt.step)`` steps on the GPU."""
    cls, kwargs = SOPHIA[name]
    base = _model("cuda")
    forms = {"foreach": True, "loop": False, "compiled": None}
    models = {k: copy.deepcopy(base) for k in forms}
    opts = {k: cls(models[k].parameters(), foreach=forms[k], **kwargs) for k in forms}
    steps = {k: torch.compile(opt.step) if k == "compiled" else opt.step for k, opt in opts.items()}
    for step in range(8):
        for k in forms:
            estimates = _fill(models[k], step)
            if step % 3 == 0:
                opts[k].update_hessian(estimates)
            steps[k]()
    for k in ("loop", "compiled"):
        for a, b in zip(models["foreach"].parameters(), models[k].parameters()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=f"{k} vs foreach")
    assert not torch.equal(next(models["foreach"].parameters()), next(base.parameters()))


@pytest.mark.parametrize("name", ["adamw", "sophia_g", "sophia_h", "flat_sophia", "soap"])
def test_bf16_mixed_training_on_gpu(tmp_path, name):
    module = make_module(name)
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(tmp_path, accelerator="gpu", precision="bf16-mixed", max_steps=7)
    t.fit(module, DataLoader(dataset(), batch_size=8))
    assert module.global_step == 7
    assert t.strategy.root_device.type == "cuda"  # trained there (Lightning moves the module back at the end)
    after = [p.detach().cpu() for p in module.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(after, before))
    if name not in ("adamw", "soap"):
        assert module.hessian_refreshes >= 2
