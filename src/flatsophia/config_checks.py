"""Checks of a composed training config that run before anything is built or trained.

Each check raises ``ValueError`` naming the config key, the bad value and what is accepted, so a
sweep fails in its first second rather than after an hour (or, worse, runs with a silent fallback).
Values the classes validate themselves (optimizer hyperparameters, module options) are checked by
building them cheaply here: the optimizer factory is called on a one-element dummy parameter.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from flatsophia.modules.optim_module import (
    HESSIAN_DEFAULTS,
    SCHEDULER_DEFAULTS,
    _merge_block,
    check_hessian_block,
    check_module_options,
)
from flatsophia.optim.factory import DECAY_RULES, get_spec
from flatsophia.optim.schedules import SCHEDULES

__all__ = ["validate_config"]


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _check_int(key: str, value, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {key}: {value!r} (expected an integer >= {low}{' or null' if allow_none else ''})")


def check_optimizer(cfg: DictConfig) -> str | None:
    """Build the optimizer on a dummy parameter (its constructor validates every hyperparameter)."""
    name = cfg.get("module", {}).get("optimizer_name")
    try:
        factory = hydra.utils.instantiate(cfg.optimizer)
    except Exception as err:  # instantiate wraps constructor errors; surface the cause
        cause = err.__cause__ or err
        raise ValueError(f"Invalid optimizer config ({name or cfg.optimizer.get('_target_')}): {cause}") from err
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"Invalid optimizer config ({name or cfg.optimizer.get('_target_')}): {err}") from err
    return name


def check_hessian(cfg: DictConfig, optimizer_name: str | None) -> None:
    """The ``hessian`` block's values and its fit with the chosen optimizer (from the registry)."""
    hessian = _merge_block("hessian", _container(cfg.get("hessian")), HESSIAN_DEFAULTS)
    check_hessian_block(hessian)
    if hessian["distribution"] not in ("gaussian", "rademacher"):
        raise ValueError(f"Invalid hessian.distribution: {hessian['distribution']!r} (expected gaussian or rademacher)")
    _check_int("hessian.n_probes", hessian["n_probes"], 1)
    _check_int("hessian.seed", hessian["seed"], 0)
    if not optimizer_name:
        return
    try:
        needed = get_spec(optimizer_name).hessian
    except ValueError:
        return  # not a registry optimizer: the module checks the class attribute at set-up
    asked = hessian["estimator"]
    if asked not in ("auto", needed):
        raise ValueError(
            f"hessian={asked} does not fit optimizer={optimizer_name}, which needs {needed!r}. Valid combinations: "
            "sophia_g/sophia + gnb; sophia_h/flat_sophia + hutchinson; adamw/soap + none (hessian=auto picks it)."
        )


def check_scheduler(cfg: DictConfig) -> None:
    sched = _merge_block("scheduler", _container(cfg.get("scheduler")), SCHEDULER_DEFAULTS)
    if sched["name"] not in SCHEDULES:
        raise ValueError(f"Invalid scheduler.name: {sched['name']!r} (choose one of {', '.join(SCHEDULES)})")
    _check_int("scheduler.warmup_steps", sched["warmup_steps"], 0)
    _check_int("scheduler.total_steps", sched["total_steps"], 1, allow_none=True)
    ratio = sched["min_lr_ratio"]
    if not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"Invalid scheduler.min_lr_ratio: {ratio!r} (expected a number in [0, 1])")


def check_trainer_limits(cfg: DictConfig) -> None:
    trainer = cfg.get("trainer", {})
    max_steps = trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1:
        _check_int("trainer.max_steps", max_steps, 1)
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1:
        _check_int("trainer.max_epochs", max_epochs, 1)


def check_data(cfg: DictConfig) -> None:
    data = cfg.get("data", {})
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            _check_int(f"data.{key}", data[key], 1)
    if "num_workers" in data:
        _check_int("data.num_workers", data["num_workers"], 0)


def check_module(cfg: DictConfig) -> None:
    module = cfg.get("module", {})
    check_module_options(
        accumulate=module.get("accumulate", 1),
        grad_clip=module.get("grad_clip"),
        nonfinite=module.get("nonfinite", "skip"),
        log_stats_every=module.get("log_stats_every", 10),
    )
    rule = module.get("weight_decay_rule", "matrices")
    if rule not in DECAY_RULES:
        raise ValueError(f"Invalid module.weight_decay_rule: {rule!r} (choose one of {', '.join(DECAY_RULES)})")


def validate_config(cfg: DictConfig) -> None:
    """Run every check; raises ``ValueError`` on the first bad value."""
    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"Invalid seed: {seed!r} (expected an integer or null)")
    check_module(cfg)
    check_data(cfg)
    check_trainer_limits(cfg)
    check_scheduler(cfg)
    name = check_optimizer(cfg)
    check_hessian(cfg, name)
