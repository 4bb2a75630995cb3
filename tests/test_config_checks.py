"""Every user-facing config value is validated before anything is built: a table of bad inputs."""

from __future__ import annotations

import pytest
import torch

from flatsophia.validation import validate_config

BAD_INPUTS = [
    # (overrides, expected message fragment)
    (["optimizer.lr=-0.1"], "Invalid learning rate: -0.1"),
    (["optimizer=sophia_g", "optimizer.rho=-1"], "Invalid rho: -1"),
    (["optimizer=sophia_h", "optimizer.gamma=-0.01"], "Invalid gamma: -0.01"),
    (["optimizer=flat_sophia", "optimizer.eps=0"], "Invalid eps: 0"),
    (["optimizer=adamw", "optimizer.weight_decay=-0.5"], "Invalid weight_decay value: -0.5"),
    (["optimizer=flat_sophia", "optimizer.betas=[0.9,1.0]"], "Invalid beta parameter at index 1: 1.0"),
    (["optimizer=flat_sophia", "optimizer.sharp_fraction=1.5"], "Invalid sharp_fraction: 1.5"),
    (["optimizer=flat_sophia", "optimizer.dampening_factor=0"], "Invalid dampening_factor: 0"),
    (["optimizer=flat_sophia", "optimizer.dampening_factor=200"], "Invalid dampening_factor: 200"),
    (["optimizer=flat_sophia", "optimizer.mask_source=fresh"], "Invalid mask_source: 'fresh'"),
    (["optimizer=flat_sophia", "optimizer.mu_dtype=int8"], "Invalid mu_dtype: 'int8'"),
    (["optimizer=soap", "optimizer.precondition_frequency=0"], "precondition_frequency: 0"),
    (["hessian.every_k=0"], "Invalid hessian.every_k: 0"),
    (["hessian.refresh_prob=2.0"], "Invalid hessian.refresh_prob: 2.0"),
    (["hessian.distribution=uniform"], "Invalid hessian.distribution: 'uniform'"),
    (["hessian.n_probes=0"], "Invalid hessian.n_probes: 0"),
    (["hessian.hvp=fd"], "Invalid hessian.hvp: 'fd'"),
    (["hessian.batch_fraction=0"], "Invalid hessian.batch_fraction: 0 (expected a number in (0, 1])"),
    (["hessian.batch_fraction=1.5"], "Invalid hessian.batch_fraction: 1.5"),
    (["optimizer=adamw", "hessian=hutchinson"], "hessian=hutchinson does not fit optimizer=adamw"),
    (["optimizer=sophia_g", "hessian=hutchinson"], "which needs 'gnb'"),
    (["optimizer=flat_sophia", "hessian=gnb"], "which needs 'hutchinson'"),
    (["module.accumulate=0"], "Invalid module.accumulate: 0"),
    (["module.grad_clip=-1"], "Invalid module.grad_clip: -1"),
    (["module.nonfinite=ignore"], "Invalid module.nonfinite: 'ignore'"),
    (["module.weight_decay_rule=biases"], "Invalid module.weight_decay_rule: 'biases'"),
    (["module.log_stats_every=0"], "Invalid module.log_stats_every: 0"),
    (["scheduler.warmup_steps=-5"], "Invalid scheduler.warmup_steps: -5"),
    (["scheduler.min_lr_ratio=1.5"], "Invalid scheduler.min_lr_ratio: 1.5"),
    (["data.batch_size=0"], "Invalid data.batch_size: 0"),
    (["trainer.max_steps=0"], "Invalid trainer.max_steps: 0"),
    (["seed=abc"], "Invalid seed: 'abc'"),
    (["trainer=fsdp_sim", "optimizer=flat_sophia", "hessian.hvp=autograd"], "Use hessian.hvp=finite_difference"),
    (["trainer=fsdp_sim", "optimizer=sophia_h", "hessian.hvp=autograd"], "cannot run on parameters sharded by FSDP2"),
    (["trainer=fsdp_sim", "optimizer=soap"], "optimizer=soap does not run under FSDP2"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_config_value_is_named(make_cfg, overrides, message):
    cfg = make_cfg(overrides)
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    assert message in str(info.value)


@pytest.mark.parametrize("optimizer", ["adamw", "sophia", "sophia_g", "sophia_h", "flat_sophia", "soap"])
def test_default_configs_pass(make_cfg, optimizer):
    validate_config(make_cfg([f"optimizer={optimizer}"]))


#: (overrides, fragments the message must hold): pairs and settings refused by what they are, not by a value.
BAD_COMBINATIONS = [
    (["model=gpt"], ["model=gpt needs token sequences (data=charlm", "data=mnist1d provides 1-D signals", "vit1d"]),
    (["data=cifar10", "model=vit1d"], ["model=vit1d needs 1-D signals", "data=cifar10 provides images", "resnet"]),
    (["data=charlm", "model=vit"], ["model=vit needs images", "data=charlm provides token sequences", "gpt, mlp"]),
    (["data=charlm", "optimized_metric=val/acc"], ["optimized_metric=val/acc is not logged for token sequences"]),
    (["data=digits", "optimized_metric=val/ppl"], ["optimized_metric=val/ppl is not logged for images"]),
    (["data.kind=video"], ["Invalid data.kind: 'video'"]),
    (["~data.kind"], ["data=mnist1d does not say what it provides: add `kind: signal | image | tokens`"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD_COMBINATIONS, ids=[" ".join(o) for o, _ in BAD_COMBINATIONS])
def test_bad_combination_is_refused_naming_both_sides(make_cfg, overrides, fragments):
    with pytest.raises(ValueError) as info:
        validate_config(make_cfg(overrides, tiny="run"))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_trainers_are_refused_without_a_gpu(make_cfg, no_gpu, trainer):
    with pytest.raises(ValueError) as info:
        validate_config(make_cfg([f"trainer={trainer}"]))
    assert str(info.value) == (
        f"trainer={trainer} needs a CUDA GPU and none was found; use trainer=cpu, or trainer=ddp_sim to exercise "
        "DDP on the CPU"
    )


def test_the_refusal_names_the_accelerator_when_it_was_overridden(make_cfg, no_gpu):
    with pytest.raises(ValueError, match=r"^trainer.accelerator=gpu needs a CUDA GPU and none was found"):
        validate_config(make_cfg(["trainer=cpu", "trainer.accelerator=gpu"]))


def test_mps_is_refused_without_apple_silicon(make_cfg, no_gpu):
    with pytest.raises(ValueError, match=r"trainer=mps needs an Apple-silicon GPU \(MPS\) and none was found"):
        validate_config(make_cfg(["trainer=mps"]))


def test_more_gpus_than_the_machine_has_is_refused(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"trainer=ddp asks for trainer.devices=4 GPUs and this machine has 1"):
        validate_config(make_cfg(["trainer=ddp"]))
    validate_config(make_cfg(["trainer=ddp", "trainer.devices=1"]))


@pytest.mark.parametrize(
    "overrides",
    [["optimizer=sophia"], ["optimizer=flat_sophia", "hessian.hvp=finite_difference"], ["optimizer=adamw"]],
)
def test_fsdp_configs_pass(make_cfg, overrides):
    validate_config(make_cfg(["trainer=fsdp_sim", *overrides]))
