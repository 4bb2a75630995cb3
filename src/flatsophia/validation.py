"""Checks of a composed config, run before anything is built, downloaded or trained.

One place for every check of the template's options: the ``hessian``, ``scheduler`` and ``module``
blocks (also used by :class:`~flatsophia.modules.optim_module.OptimLitModule` when it is built
directly), the Trainer options manual optimization forbids, and the optimizer's hyperparameters
(checked by building it on a dummy parameter). Each check raises ``ValueError`` naming the key, the
bad value and what is accepted, so a sweep fails in its first second rather than after an hour.
Messages about valid combinations are built from the optimizer registry.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from flatsophia.checks import check_choice, check_int
from flatsophia.hessian.hutchinson import DISTRIBUTIONS, HVP_MODES, SHARDED_AUTOGRAD
from flatsophia.hessian.refresh import check_estimator_fits  # the refresher's own check (torch only)
from flatsophia.optim.factory import DECAY_RULES, HESSIAN_ESTIMATORS, get_spec
from flatsophia.optim.schedules import SCHEDULES

__all__ = [
    "HESSIAN_DEFAULTS",
    "SCHEDULER_DEFAULTS",
    "TASKS",
    "NONFINITE_POLICIES",
    "merge_block",
    "check_hessian_block",
    "check_scheduler_block",
    "check_module_options",
    "check_estimator_fits",
    "check_trainer_config",
    "check_choice",
    "validate_config",
]

TASKS = ("classification", "lm")
NONFINITE_POLICIES = ("skip", "raise")

#: Defaults of the ``hessian`` block; every key a user sets must be one of these.
HESSIAN_DEFAULTS = dict(
    estimator="auto", every_k=10, refresh_prob=None, distribution="gaussian", n_probes=1, seed=0, hvp="autograd"
)
SCHEDULER_DEFAULTS = dict(name="cosine", warmup_steps=0, min_lr_ratio=0.0, total_steps=None)

#: Trainer options that Lightning rejects under manual optimization, and what to use instead.
_MANUAL_OPT_REPLACEMENTS = {
    "gradient_clip_val": "module.grad_clip={value}",
    "gradient_clip_algorithm": "module.grad_clip (the module always clips the global L2 norm)",
    "accumulate_grad_batches": "module.accumulate={value}",
}


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def merge_block(name: str, given: dict | None, defaults: dict) -> dict:
    """``defaults`` updated with ``given``; a key not in ``defaults`` raises ``ValueError`` naming it."""
    out = dict(defaults)
    for key, value in dict(given or {}).items():
        if key not in defaults:
            raise ValueError(f"Unknown key {name}.{key}; valid keys: {', '.join(defaults)}")
        out[key] = value
    return out


def check_hessian_block(hessian: dict) -> None:
    """Validate a merged ``hessian`` block (see :data:`HESSIAN_DEFAULTS`)."""
    check_choice("hessian.estimator", hessian["estimator"], ("auto", *HESSIAN_ESTIMATORS))
    check_int("hessian.every_k", hessian["every_k"], 1)
    p = hessian["refresh_prob"]
    if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
        raise ValueError(f"Invalid hessian.refresh_prob: {p!r} (expected null or a number in (0, 1])")
    check_choice("hessian.distribution", hessian["distribution"], DISTRIBUTIONS)
    check_int("hessian.n_probes", hessian["n_probes"], 1)
    check_int("hessian.seed", hessian["seed"], 0)
    check_choice("hessian.hvp", hessian["hvp"], HVP_MODES)


def check_scheduler_block(sched: dict) -> None:
    """Validate a merged ``scheduler`` block (see :data:`SCHEDULER_DEFAULTS`)."""
    check_choice("scheduler.name", sched["name"], SCHEDULES)
    check_int("scheduler.warmup_steps", sched["warmup_steps"], 0)
    check_int("scheduler.total_steps", sched["total_steps"], 1, allow_none=True)
    ratio = sched["min_lr_ratio"]
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio <= 1:
        raise ValueError(f"Invalid scheduler.min_lr_ratio: {ratio!r} (expected a number in [0, 1])")


def check_module_options(
    accumulate=1, grad_clip=None, nonfinite="skip", log_stats_every=10, weight_decay_rule="matrices"
) -> None:
    """Validate the ``module.*`` training-loop options."""
    check_int("module.accumulate", accumulate, 1)
    if grad_clip is not None and (
        not isinstance(grad_clip, (int, float)) or isinstance(grad_clip, bool) or grad_clip < 0
    ):
        raise ValueError(f"Invalid module.grad_clip: {grad_clip!r} (expected null or a number >= 0)")
    check_choice("module.nonfinite", nonfinite, NONFINITE_POLICIES)
    check_int("module.log_stats_every", log_stats_every, 1)
    check_choice("module.weight_decay_rule", weight_decay_rule, DECAY_RULES)


def check_trainer_config(trainer_cfg) -> None:
    """Reject Trainer options that conflict with the module's manual optimization, and bad limits."""
    for key, instead in _MANUAL_OPT_REPLACEMENTS.items():
        value = trainer_cfg.get(key)
        if value is None or (key == "accumulate_grad_batches" and value == 1):
            continue
        raise ValueError(
            f"trainer.{key}={value!r} is not supported: OptimLitModule uses manual optimization, where "
            f"Lightning refuses it. Remove trainer.{key} and use {instead.format(value=value)} instead."
        )
    for key in ("max_steps", "max_epochs"):
        value = trainer_cfg.get(key)
        if value is not None and value != -1:
            check_int(f"trainer.{key}", value, 1)


def check_optimizer(cfg: DictConfig) -> str | None:
    """Build the optimizer on a dummy parameter (its constructor validates every hyperparameter)."""
    name = cfg.get("module", {}).get("optimizer_name")
    label = name or cfg.optimizer.get("_target_")
    try:
        factory = hydra.utils.instantiate(cfg.optimizer)
    except Exception as err:  # instantiate wraps constructor errors; surface the cause
        cause = err.__cause__ or err
        raise ValueError(f"Invalid optimizer config ({label}): {cause}") from err
    try:
        factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ValueError(f"Invalid optimizer config ({label}): {err}") from err
    return name


def check_hessian(cfg: DictConfig, optimizer_name: str | None) -> None:
    """The ``hessian`` block's values and its fit with the chosen optimizer (from the registry)."""
    hessian = merge_block("hessian", _container(cfg.get("hessian")), HESSIAN_DEFAULTS)
    check_hessian_block(hessian)
    if not optimizer_name:
        return
    try:
        needed = get_spec(optimizer_name).hessian
    except ValueError:
        return  # not a registry optimizer: the module checks the class attribute at set-up
    check_estimator_fits(hessian["estimator"], needed, optimizer_name)


def check_sharded(cfg: DictConfig, optimizer_name: str | None) -> None:
    """Under FSDP2 (``trainer=fsdp``/``fsdp_sim``: Lightning's ModelParallelStrategy) refuse what
    cannot run on sharded parameters: Hutchinson with ``hvp=autograd``, and SOAP."""
    strategy = cfg.get("trainer", {}).get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if not target.endswith("ModelParallelStrategy") or not optimizer_name:
        return
    try:
        spec = get_spec(optimizer_name)
    except ValueError:
        return  # not a registry optimizer: the module checks at set-up
    if spec.name == "soap":
        raise ValueError("optimizer=soap does not run under FSDP2 (trainer=fsdp/fsdp_sim); use trainer=ddp")
    hessian = merge_block("hessian", _container(cfg.get("hessian")), HESSIAN_DEFAULTS)
    if spec.hessian == "hutchinson" and hessian["hvp"] == "autograd":
        raise ValueError(SHARDED_AUTOGRAD)


def check_data(cfg: DictConfig) -> None:
    data = cfg.get("data", {})
    for key in ("batch_size", "eval_batch_size"):
        if key in data:
            check_int(f"data.{key}", data[key], 1)
    if "num_workers" in data:
        check_int("data.num_workers", data["num_workers"], 0)


def check_module(cfg: DictConfig) -> None:
    module = cfg.get("module", {})
    check_module_options(
        accumulate=module.get("accumulate", 1),
        grad_clip=module.get("grad_clip"),
        nonfinite=module.get("nonfinite", "skip"),
        log_stats_every=module.get("log_stats_every", 10),
        weight_decay_rule=module.get("weight_decay_rule", "matrices"),
    )


def validate_config(cfg: DictConfig) -> None:
    """Run every check; raises ``ValueError`` on the first bad value."""
    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"Invalid seed: {seed!r} (expected an integer or null)")
    check_trainer_config(cfg.get("trainer", {}))
    check_module(cfg)
    check_data(cfg)
    check_scheduler_block(merge_block("scheduler", _container(cfg.get("scheduler")), SCHEDULER_DEFAULTS))
    name = check_optimizer(cfg)
    check_hessian(cfg, name)
    check_sharded(cfg, name)
