"""Every user-facing config value is validated before anything is built: a table of bad inputs."""

from __future__ import annotations

import pytest

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
    (["trainer=fsdp_sim", "optimizer=flat_sophia"], "Use hessian.hvp=finite_difference"),
    (["trainer=fsdp", "optimizer=sophia_h", "hessian=hutchinson"], "cannot run on parameters sharded by FSDP2"),
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


@pytest.mark.parametrize(
    "overrides",
    [["optimizer=sophia"], ["optimizer=flat_sophia", "hessian.hvp=finite_difference"], ["optimizer=adamw"]],
)
def test_fsdp_configs_pass(make_cfg, overrides):
    validate_config(make_cfg(["trainer=fsdp_sim", *overrides]))
