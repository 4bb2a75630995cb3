"""Every config composes and resolves; models instantiate on every dataset they fit and return logits."""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from flatsophia.optim import ALIASES, OPTIMIZERS, param_groups
from flatsophia.validation import model_accepts

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = [
    "data",
    "model",
    "optimizer",
    "hessian",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "paths",
    "extras",
    "experiment",
    "ablation",
]
#: Groups whose files are `# @package _global_` overlays.
GLOBAL_GROUPS = ("debug", "experiment", "ablation", "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def data_for(group: str, option: str) -> list[str]:
    """For a model option, ``data=<first option it takes>``; nothing for other groups."""
    if group != "model":
        return []
    accepts = model_accepts(OmegaConf.load(CONF_DIR / "model" / f"{option}.yaml")._target_)
    data = next(d for d in options("data") if OmegaConf.load(CONF_DIR / "data" / f"{d}.yaml").kind in accepts)
    return [f"data={data}"]


def resolved(cfg) -> dict:
    """The config without the hydra node, with every interpolation resolved."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_composes(make_cfg, group, option):
    """Each option composes alone with the other defaults, every interpolation resolves, and its keys arrive.

    A model comes with data it takes (the first data option of a kind in its ``accepts``): a model
    reads the data's shape, and e.g. vit cannot find an image side in a 1-D signal's shape (that
    pair is refused by the config check, tests/test_compose.py).
    """
    cfg = make_cfg([f"{group}={option}", *data_for(group, option)], tiny=False)
    out = resolved(cfg)
    assert HydraConfig.get().runtime.choices[group] == option
    raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml") or {}
    package = out if group in GLOBAL_GROUPS else out[group] or {}
    for key in raw:
        if key not in ("defaults", "hydra"):
            assert key in package, f"{group}/{option}.yaml sets {key!r}, missing from the composed config"
    if group == "optimizer":
        assert out["module"]["optimizer_name"] == option


@pytest.mark.parametrize("option", options("hydra/launcher"))
def test_launcher_composes(make_cfg, option):
    cfg = make_cfg([f"hydra/launcher={option}"], tiny=False)
    assert "_target_" in cfg.hydra.launcher
    OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


@pytest.mark.parametrize("option", [o for o in options("hparams_search") if not o.startswith("qmc")])
def test_hparams_search(make_cfg, option):
    """The TPE searches (qmc* are tested in test_tuning.py)."""
    raw = yaml.safe_load((CONF_DIR / "hparams_search" / f"{option}.yaml").read_text())
    assert raw["hydra"]["sweeper"]["params"]["optimizer.lr"].startswith("tag(log")
    cfg = make_cfg([f"hparams_search={option}"], tiny=False)
    assert cfg.optimized_metric == "val/loss"


def test_eval_config_composes(cfg_eval):
    out = resolved(cfg_eval)
    assert out["ckpt_path"] is None and out["task_name"] == "eval"


#: Optimizers each experiment is meant to compare (its optimizer keys exist in all of them).
SWAPPABLE = {"flat_sophia_cifar10": ("sophia_h", "flat_sophia")}


def test_experiments_swap_optimizers(make_cfg):
    """Experiments set only optimizer keys that the compared optimizers share."""
    for experiment in options("experiment"):
        for name in SWAPPABLE.get(experiment, tuple(OPTIMIZERS)):
            cfg = make_cfg([f"experiment={experiment}", f"optimizer={name}"], tiny=False)
            factory = hydra.utils.instantiate(cfg.optimizer)
            factory([torch.nn.Parameter(torch.zeros(3, 3))])


def test_reference_experiment_values(make_cfg):
    cfg = make_cfg(["experiment=flat_sophia_cifar10"], tiny=False)
    assert (cfg.data.batch_size, cfg.trainer.max_epochs) == (512, 100)
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads) == (4, 512, 8)
    assert cfg.model.drop_rate == 0.0
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (3e-3, 0.3)
    assert (cfg.optimizer.sharp_fraction, cfg.optimizer.dampening_factor) == (0.2, 10)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps, cfg.scheduler.min_lr_ratio) == ("linear", 512, 0.0)
    assert cfg.module.weight_decay_rule == "matrices"
    assert cfg.hessian.refresh_prob == 0.1


def test_every_registered_optimizer_has_a_config():
    names = set(options("optimizer"))
    assert set(OPTIMIZERS) <= names
    assert names - set(OPTIMIZERS) <= set(ALIASES)


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_configs_build_with_param_groups(make_cfg, name):
    cfg = make_cfg([f"optimizer={name}"], tiny=False)
    assert cfg.optimizer._partial_ is True
    factory = hydra.utils.instantiate(cfg.optimizer)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    opt = factory(param_groups(net, decay="matrices"))
    spec = OPTIMIZERS[ALIASES.get(name, name)]
    assert isinstance(opt, spec.cls)
    # every key of the YAML is an argument of the class (no silently ignored knobs)
    params = inspect.signature(spec.cls.__init__).parameters
    for key in cfg.optimizer:
        if not key.startswith("_"):
            assert key in params, f"optimizer/{name}.yaml sets {key!r}, which {spec.cls.__name__} does not take"


def test_no_config_sets_lightning_clipping_or_accumulation():
    for path in CONF_DIR.rglob("*.yaml"):
        text = path.read_text()
        for key in ("gradient_clip_val", "accumulate_grad_batches"):
            assert f"{key}:" not in text, f"{path} sets trainer.{key}; use module.grad_clip / module.accumulate"


def test_wandb_offline_without_credentials(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_cfg(["logger=wandb", "experiment=flat_sophia_overfit"], tiny=False)
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.group == "flat_sophia_overfit"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cfg.logger.wandb.offline is False


def test_run_dirs_have_sub_second_stamps(make_cfg):
    cfg = make_cfg(tiny=False)
    assert "%f" in OmegaConf.to_container(cfg.hydra.run)["dir"]
    assert "%f" in OmegaConf.to_container(cfg.hydra.sweep)["dir"]


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_instantiate(make_cfg, option):
    from flatsophia.utils import instantiate_callbacks

    callbacks = instantiate_callbacks(make_cfg([f"callbacks={option}"], tiny=False).callbacks)
    names = {type(c).__name__ for c in callbacks}
    if option == "none":
        assert not callbacks
    if option in ("default", "early_stopping", "sharpness"):
        assert {"ModelCheckpoint", "LearningRateMonitor"} <= names


@pytest.mark.parametrize("option", options("logger"))
def test_loggers_instantiate(make_cfg, option, monkeypatch):
    from flatsophia.utils import instantiate_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    loggers = instantiate_loggers(make_cfg([f"logger={option}"], tiny=False).get("logger"))
    assert (len(loggers) == 0) == (option == "none")


def _tuned_files() -> list[tuple[str, str]]:
    """``(optimizer, data)`` of every conf/tuned/<optimizer>_<data>.yaml."""
    data = options("data")
    out = []
    for name in options("tuned"):
        (d,) = [d for d in data if name.endswith(f"_{d}")]
        out.append((name[: -len(d) - 1], d))
    return out


def _optimizer_file(name: str):
    """conf/optimizer/<name>.yaml merged over the files its defaults list names (e.g. flat_sophia over sophia_h)."""
    cfg = OmegaConf.load(CONF_DIR / "optimizer" / f"{name}.yaml")
    parents = [d for d in cfg.pop("defaults", []) if d != "_self_"]
    return OmegaConf.merge(*[_optimizer_file(p) for p in parents], cfg) if parents else cfg


@pytest.mark.parametrize(("optimizer", "data"), _tuned_files())
def test_tuned_settings_apply_to_their_data_without_an_experiment(make_cfg, optimizer, data):
    cfg = make_cfg([f"optimizer={optimizer}", f"data={data}"], tiny=False)
    assert HydraConfig.get().runtime.choices.tuned == f"{optimizer}_{data}"
    tuned = OmegaConf.load(CONF_DIR / "tuned" / f"{ALIASES.get(optimizer, optimizer)}_{data}.yaml")
    assert tuned and all(cfg.optimizer[k] == v for k, v in tuned.items()), "the composed optimizer has the tuned values"
    reference = _optimizer_file(ALIASES.get(optimizer, optimizer))
    assert make_cfg([f"optimizer={optimizer}", f"data={data}", "optimizer.lr=0.123"], tiny=False).optimizer.lr == 0.123
    other = next(d for d in options("data") if (optimizer, d) not in _tuned_files())
    assert make_cfg([f"optimizer={optimizer}", f"data={other}"], tiny=False).optimizer.lr == reference.lr


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_do_not_take_the_default_workloads_tuned_settings(make_cfg, experiment):
    make_cfg([f"experiment={experiment}"], tiny=False)
    assert HydraConfig.get().runtime.choices.get("tuned") is None, (
        f"experiment/{experiment}.yaml should turn conf/tuned off (`- override /tuned: null`): an experiment pins "
        "its own settings, and keys it leaves to the optimizer config would otherwise change with data=mnist1d"
    )
