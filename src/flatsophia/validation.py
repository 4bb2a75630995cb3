"""Checks of a composed config, run before anything is built, downloaded or trained.

One place for every check of the template's options: the ``hessian``, ``scheduler`` and ``module``
blocks (also used by :class:`~flatsophia.modules.optim_module.OptimLitModule` when it is built
directly), the Trainer options manual optimization forbids, and the optimizer's hyperparameters
(checked by building it on a dummy parameter), the data x model pair (the data config's ``kind``
against the model's ``accepts``) and the hardware the trainer asks for. Each check raises
``ValueError`` naming the key, the bad value and what is accepted, so a sweep fails in its first
second rather than after an hour. Messages about valid combinations are built from the optimizer
registry and from the options in ``conf/``.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from flatsophia.checks import check_choice, check_int, check_probability
from flatsophia.data._base import KINDS, TASKS
from flatsophia.hessian.hutchinson import DISTRIBUTIONS, HVP_MODES
from flatsophia.optim.factory import DECAY_RULES, HESSIAN_ESTIMATORS, estimator_combinations, get_spec
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
    "check_int",
    "check_data_model",
    "check_hardware",
    "group_options",
    "check_global_batch",
    "check_per_optimizer",
    "validate_config",
]

NONFINITE_POLICIES = ("skip", "raise")

#: The library's :data:`~flatsophia.hessian.hutchinson.SHARDED_AUTOGRAD`, in config keys.
SHARDED_AUTOGRAD = (
    "Hutchinson with hessian.hvp=autograd cannot run on parameters sharded by FSDP2 (trainer=fsdp/fsdp_sim): "
    "torch.autograd.grad cannot reach the sharded DTensor parameters, and a double backward through FSDP is "
    "not supported. Use hessian.hvp=finite_difference (hessian.hvp=auto picks it there), or "
    "optimizer=sophia_g (Gauss-Newton-Bartlett)."
)

#: Defaults of the ``hessian`` block; every key a user sets must be one of these.
HESSIAN_DEFAULTS = dict(
    estimator="auto",
    every_k=10,
    refresh_prob=None,
    distribution="gaussian",
    n_probes=1,
    seed=0,
    hvp="auto",
    batch_fraction=1,
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
    check_probability("hessian.refresh_prob", hessian["refresh_prob"], allow_none=True)
    check_choice("hessian.distribution", hessian["distribution"], DISTRIBUTIONS)
    check_int("hessian.n_probes", hessian["n_probes"], 1)
    check_int("hessian.seed", hessian["seed"], 0)
    check_choice("hessian.hvp", hessian["hvp"], ("auto", *HVP_MODES))
    check_probability("hessian.batch_fraction", hessian["batch_fraction"])


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


def check_estimator_fits(asked: str, needed: str, optimizer_name: str) -> None:
    """``hessian.estimator`` against the optimizer's estimator (``auto`` fits all), in config keys: the
    library's :func:`~flatsophia.hessian.refresh.check_estimator_fits` as a template user types it."""
    if asked not in ("auto", needed):
        raise ValueError(
            f"hessian={asked} does not fit optimizer={optimizer_name}, which needs {needed!r}. "
            f"Valid combinations: {estimator_combinations()} (hessian=auto picks the right one)."
        )


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


#: How messages name each data kind.
KIND_NOUNS = {"signal": "1-D signals", "image": "images", "tokens": "token sequences"}


def _conf_dirs() -> list[Path]:
    """The config folders of the running Hydra app (its ``conf/``), else the repository's ``conf/``."""
    from hydra.core.hydra_config import HydraConfig

    dirs = []
    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.get("config_sources", []):
            if source.get("schema") == "file":
                dirs.append(Path(source.path))
    dirs.append(Path(__file__).resolve().parents[2] / "conf")
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def group_options(group: str) -> dict[str, DictConfig]:
    """``{option: raw config}`` of the top-level ``*.yaml`` files of config group ``group``, by name."""
    out: dict[str, DictConfig] = {}
    for root in _conf_dirs():
        for path in sorted((root / group).glob("*.yaml")):
            out.setdefault(path.stem, OmegaConf.load(path))
    return dict(sorted(out.items()))


def _choice(group: str) -> str | None:
    """The option chosen for ``group`` in the running Hydra app (``None`` outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def model_accepts(target: str | None) -> tuple[str, ...] | None:
    """The data kinds the model ``_target_`` declares it takes (its ``accepts``); ``None`` if it declares none."""
    if not target:
        return None
    try:
        obj = hydra.utils.get_object(str(target))
    except Exception:  # a wrong _target_ is reported by instantiate, with Hydra's message
        return None
    accepts = getattr(obj, "accepts", None)
    return tuple(accepts) if accepts is not None else None


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def check_data_model(cfg: DictConfig) -> None:
    """Refuse a data x model pair that cannot work, naming both and the options that fit.

    The data config declares ``kind`` (signal, image or tokens); the model's class (or function)
    declares the kinds it takes as ``accepts``. Models that declare nothing are not checked.
    """
    data, model = cfg.get("data"), cfg.get("model")
    if not data or not model:
        return
    data_label = f"data={_choice('data') or data.get('_target_')}"
    kind = data.get("kind")
    if kind is None:
        raise ValueError(
            f"{data_label} does not say what it provides: add `kind: {' | '.join(KINDS)}` (with `input_shape` and "
            "`num_classes`) to its config; model configs read these three keys."
        )
    check_choice("data.kind", kind, KINDS)
    accepts = model_accepts(model.get("_target_"))
    if accepts is None or kind in accepts:
        return
    model_label = f"model={_choice('model') or model.get('_target_')}"
    data_options = group_options("data")
    fitting_data = [f"data={name}" for name, c in data_options.items() if c.get("kind") in accepts]
    fitting_models = [
        name for name, c in group_options("model").items() if kind in (model_accepts(c.get("_target_")) or ())
    ]
    needs = _either([KIND_NOUNS[k] for k in accepts])
    raise ValueError(
        f"{model_label} needs {needs}"
        + (f" ({_either(fitting_data)})" if fitting_data else "")
        + f"; {data_label} provides {KIND_NOUNS[kind]}. "
        + (f"Models for {KIND_NOUNS[kind]}: {', '.join(fitting_models)}." if fitting_models else "")
    )


def check_metric_fits(cfg: DictConfig) -> None:
    """Refuse an ``optimized_metric`` the task never logs (accuracy of a language model, perplexity of a classifier)."""
    metric, kind = cfg.get("optimized_metric"), (cfg.get("data") or {}).get("kind")
    if not metric or kind not in KINDS:
        return
    name = str(metric).rsplit("/", 1)[-1]
    lm = kind == "tokens"
    if (lm and name.startswith("acc")) or (not lm and name.startswith("ppl")):
        logged = "val/loss, val/loss_best, val/ppl" if lm else "val/loss, val/loss_best, val/acc, val/acc_best"
        raise ValueError(
            f"optimized_metric={metric} is not logged for {KIND_NOUNS[kind]} (data={_choice('data') or kind}); "
            f"validation logs {logged}."
        )


def _trainer_label(accelerator: str) -> str:
    """``trainer=<choice>`` when the chosen trainer option set ``accelerator``, else the override."""
    choice = _choice("trainer")
    chosen = (group_options("trainer").get(choice) or {}).get("accelerator") if choice else None
    return f"trainer={choice}" if chosen == accelerator else f"trainer.accelerator={accelerator}"


def check_hardware(cfg: DictConfig) -> None:
    """Refuse a trainer that asks for a GPU (CUDA or Apple MPS) this machine does not have."""
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator") or "cpu").lower()
    instead = "use trainer=cpu, or trainer=ddp_sim to exercise DDP on the CPU"
    mps = torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not (accelerator == "gpu" and mps):
        if not torch.cuda.is_available():
            raise ValueError(f"{_trainer_label(accelerator)} needs a CUDA GPU and none was found; {instead}")
        devices, count = trainer.get("devices"), torch.cuda.device_count()
        if isinstance(devices, int) and not isinstance(devices, bool) and devices > count:
            raise ValueError(
                f"{_trainer_label(accelerator)} asks for trainer.devices={devices} GPUs and this machine has {count}; "
                f"set trainer.devices={count} (or fewer)"
            )
    elif accelerator == "mps" and not mps:
        label = _trainer_label(accelerator)
        raise ValueError(f"{label} needs an Apple-silicon GPU (MPS) and none was found; {instead}")


def check_sharded(cfg: DictConfig, optimizer_name: str | None) -> None:
    """Under FSDP2 (``trainer=fsdp``/``fsdp_sim``: Lightning's ModelParallelStrategy) refuse what
    cannot run on sharded parameters: Hutchinson with ``hvp=autograd`` (``auto`` takes the finite
    difference there), and SOAP."""
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


def device_count(trainer) -> int | None:
    """Processes per node that ``trainer.devices`` asks for, as Lightning counts them: an int, a list of
    device ids, ``"auto"``/``-1`` (every visible GPU; one process on the CPU); ``None`` when unknown."""
    devices = trainer.get("devices", 1)
    accelerator = str(trainer.get("accelerator") or "cpu").lower()
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto" or text == "-1":
            devices = -1
        elif "," in text:
            return len([d for d in text.split(",") if d.strip()])
        elif text.lstrip("-").isdigit():
            devices = int(text)
        else:
            return None
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    if isinstance(devices, bool) or not isinstance(devices, int):
        return None
    if devices == -1:
        if accelerator == "cpu":
            return 1
        return torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") else None
    return devices


def check_global_batch(cfg: DictConfig) -> None:
    """Refuse a run whose global batch differs from the one its experiment intends (``data.tokens_per_step``).

    Tokens per optimizer step = data.batch_size x data.block_size x module.accumulate x trainer.devices
    x trainer.num_nodes. The message names the four factors that set the global batch, and the
    accumulation that would fit when one does. Not checked under ``trainer.fast_dev_run`` (a run of
    one batch that tests the code paths, e.g. ``debug=fast_dev_run`` on a laptop).
    """
    data = cfg.get("data") or {}
    wanted = data.get("tokens_per_step")
    if wanted is None:
        return
    check_int("data.tokens_per_step", wanted, 1)
    trainer = cfg.get("trainer") or {}
    if trainer.get("fast_dev_run"):
        return
    devices = device_count(trainer)
    if devices is None:
        return  # unknown before the trainer starts (e.g. devices="auto" on an unusual accelerator)
    batch, block = data.get("batch_size"), data.get("block_size")
    accumulate = (cfg.get("module") or {}).get("accumulate", 1)
    nodes = trainer.get("num_nodes") or 1
    got = batch * block * accumulate * devices * nodes
    if got == wanted:
        return
    per_micro = batch * block * devices * nodes
    hint = f" (module.accumulate={wanted // per_micro} fits)" if wanted % per_micro == 0 else ""
    raise ValueError(
        f"Global batch mismatch: data.batch_size={batch} x module.accumulate={accumulate} x trainer.devices={devices} "
        f"x trainer.num_nodes={nodes} sequences of data.block_size={block} tokens = {got:,} tokens per optimizer "
        f"step, but data.tokens_per_step={wanted:,} ({wanted / block:g} sequences). Change these four factors so "
        f"that their product is {wanted / block:g}{hint}, or set data.tokens_per_step=null to run another batch."
    )


def check_per_optimizer(cfg: DictConfig) -> None:
    """Refuse an optimizer the experiment has no per-optimizer settings for, when it has some for others
    (``conf/per_optimizer/<optimizer>_<experiment>.yaml``): it would silently run at library defaults."""
    experiment, optimizer = _choice("experiment"), _choice("optimizer")
    if not experiment or not optimizer:
        return
    files = group_options("per_optimizer")
    have = [name for name in group_options("optimizer") if f"{name}_{experiment}" in files]
    if have and optimizer not in have:
        raise ValueError(
            f"experiment={experiment} has per-optimizer settings for {', '.join(have)} and none for "
            f"optimizer={optimizer}: choose one of those, or add conf/per_optimizer/{optimizer}_{experiment}.yaml "
            "(with a settings_source naming where its values come from)"
        )


def check_endless_data(cfg: DictConfig) -> None:
    """A datamodule whose training stream never ends an epoch (``endless_train``) needs a step limit."""
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    try:
        cls = hydra.utils.get_object(str(data.get("_target_")))
    except Exception:  # a wrong _target_ is reported by instantiate
        return
    if not getattr(cls, "endless_train", False):
        return
    max_steps, limit = trainer.get("max_steps"), trainer.get("limit_train_batches")
    finite_epochs = isinstance(limit, int) and not isinstance(limit, bool) and trainer.get("max_epochs", -1) != -1
    bounded = finite_epochs or trainer.get("max_time") or trainer.get("fast_dev_run")
    if (max_steps is None or max_steps < 1) and not bounded:
        raise ValueError(
            f"data={_choice('data') or data.get('_target_')} streams training windows without end (an epoch never "
            f"ends), so trainer.max_steps={max_steps} and trainer.max_epochs={trainer.get('max_epochs')} never stop "
            "training: set trainer.max_steps (optimizer steps), e.g. trainer.max_steps=1000"
        )


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
    check_hardware(cfg)
    check_data_model(cfg)
    check_metric_fits(cfg)
    check_module(cfg)
    check_data(cfg)
    check_endless_data(cfg)
    check_global_batch(cfg)
    check_per_optimizer(cfg)
    check_scheduler_block(merge_block("scheduler", _container(cfg.get("scheduler")), SCHEDULER_DEFAULTS))
    name = check_optimizer(cfg)
    check_hessian(cfg, name)
    check_sharded(cfg, name)
