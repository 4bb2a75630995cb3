"""Every choice of every config group runs one tiny training, or is refused before anything is built.

The options are read from conf/ itself, so a new config file is covered without editing this file:
every data x model pair, every optimizer x hessian pair, every trainer (with every logger at once),
every logger, callbacks and debug option, and every experiment. A refusal must name what was chosen
and what would fit; the only refusals accepted are a model that does not take the data, a Hessian
estimator the optimizer does not use, hardware this machine lacks, and data files that need a
download (checked as such: the run stops before the model is built). Options of known files get tiny
sizes from SMALL; an unknown option runs at its configured size (one batch).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from flatsophia import training
from flatsophia.optim import ALIASES, get_spec
from flatsophia.training import train
from flatsophia.validation import check_hardware, model_accepts

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


#: Tiny sizes for the options we know (applied when that option is chosen).
SMALL = {
    "data": {
        "mnist1d": ["data.num_samples=1000", "data.n_val=200"],
        "charlm": ["data.max_chars=20000", "data.block_size=32"],
        "tinyshakespeare": ["data.block_size=32"],
        # + data.data_dir of the token_files fixture (bytes tokenizer), see test_data_model_pair_trains_or_is_refused
        "tokens": ["data.dataset=bytes", "data.num_classes=256", "data.block_size=32", "data.eval_iters=2"],
    },
    "model": {
        "vit1d": ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
        "vit": ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
        "gpt": ["model.n_layer=1", "model.n_embd=32", "model.n_head=2"],
        "mlp": ["model.hidden_sizes=[16]", "model.embed_dim=8"],
    },
}
#: A few small batches, no sanity check, no loggers or callbacks unless a test picks them.
SHORT = [
    "logger=none",
    "callbacks=none",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "++trainer.limit_train_batches=3",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "scheduler.warmup_steps=1",
]
#: The default data made tiny, with a tiny MLP (the cheapest model) for the option tests that do not vary them.
TINY_RUN = [*SHORT, *SMALL["data"]["mnist1d"], "model=mlp", *SMALL["model"]["mlp"]]


def _target(model: str) -> str:
    return OmegaConf.load(CONF / "model" / f"{model}.yaml")._target_


def small(data: str | None = None, model: str | None = None) -> list[str]:
    return [*SMALL["data"].get(data, []), *SMALL["model"].get(model, [])]


def finite(metrics: dict, *keys: str) -> None:
    for key in keys:
        assert key in metrics and math.isfinite(metrics[key]), f"{key}: {metrics.get(key)} in {sorted(metrics)}"


def refused(cfg) -> str:
    """The message of the ValueError that ``train(cfg)`` raises (it must raise one)."""
    with pytest.raises(ValueError) as info:
        train(cfg)
    return str(info.value)


def needs_download(cfg) -> FileNotFoundError | None:
    """The error of a datamodule whose files are missing (download=false), else None."""
    try:
        hydra.utils.instantiate(cfg.data).check_available()
    except FileNotFoundError as err:
        return err
    return None


def assert_stops_before_the_model(cfg, monkeypatch) -> None:
    """``train(cfg)`` stops with the 'run with data.download=true' (or, for token files, 'write them with
    scripts/prepare_tokens.py') message before any model is built."""

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the missing data were reported")

    monkeypatch.setattr(training, "build_module", no_model)
    with pytest.raises(FileNotFoundError, match=r"not found.*(data\.download=true|scripts/prepare_tokens\.py)"):
        train(cfg)


# ------------------------------------------------------------------------------------------------ data x model


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_data_model_pair_trains_or_is_refused(make_cfg, monkeypatch, request, data, model):
    files = [f"data.data_dir={request.getfixturevalue('token_files').parent}"] if data == "tokens" else []
    overrides = [f"data={data}", f"model={model}", *SHORT, *small(data, model), *files, "debug=fast_dev_run"]
    cfg = make_cfg(overrides, tiny=False)
    accepts = model_accepts(cfg.model._target_)
    assert accepts, f"{cfg.model._target_} declares no `accepts` (the data kinds it takes)"
    if cfg.data.kind not in accepts:
        message = refused(cfg)
        assert f"model={model} needs" in message and f"data={data} provides" in message, message
        listed = message.split("Models for ", 1)[1]
        assert all(m in listed for m in options("model") if cfg.data.kind in model_accepts(_target(m))), message
        return
    if needs_download(cfg):
        assert_stops_before_the_model(cfg, monkeypatch)
        # The network still fits the shapes the data config declares.
        net = hydra.utils.instantiate(cfg.model)
        shape = tuple(cfg.data.input_shape)
        x = torch.randint(0, cfg.data.num_classes, (2, *shape)) if cfg.data.kind == "tokens" else torch.randn(2, *shape)
        expected = (2, *shape, cfg.data.num_classes) if cfg.data.kind == "tokens" else (2, cfg.data.num_classes)
        assert net(x).shape == expected
        return
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    finite(metrics, "train/loss_step", "val/loss", "test/loss")
    finite(metrics, "val/ppl" if cfg.data.kind == "tokens" else "val/acc")


@pytest.mark.parametrize("data", options("data"))
def test_choosing_the_data_alone_picks_a_model_that_takes_it(make_cfg, data):
    cfg = make_cfg([f"data={data}"], tiny=False)
    assert HydraConfig.get().runtime.choices.model == f"auto/{data}"
    assert (CONF / "model" / "auto" / f"{data}.yaml").is_file()
    assert cfg.data.kind in model_accepts(cfg.model._target_)


def test_every_kind_of_data_has_two_models_or_more():
    for kind in {OmegaConf.load(CONF / "data" / f"{d}.yaml").kind for d in options("data")}:
        models = [m for m in options("model") if kind in model_accepts(_target(m))]
        assert len(models) >= 2, (kind, models)


# ------------------------------------------------------------------------------------------- optimizer x hessian


@pytest.mark.parametrize("hessian", options("hessian"))
@pytest.mark.parametrize("optimizer", options("optimizer"))
def test_optimizer_hessian_pair_trains_or_is_refused(make_cfg, optimizer, hessian):
    cfg = make_cfg([*TINY_RUN, f"optimizer={optimizer}", f"hessian={hessian}", "debug=fast_dev_run"], tiny=False)
    needed = get_spec(ALIASES.get(optimizer, optimizer)).hessian
    if cfg.hessian.estimator not in ("auto", needed):
        message = refused(cfg)
        assert f"hessian={hessian} does not fit optimizer={optimizer}, which needs {needed!r}" in message
        return
    metrics, objects = train(cfg)
    assert objects["model"].estimator_name == needed
    finite(metrics, "val/loss", "test/loss")


# ------------------------------------------------------------------------------------------- trainers and loggers


def spawns(cfg) -> bool:
    return "spawn" in str(cfg.trainer.get("strategy", ""))


def trainer_options() -> list:
    """The trainer options; those that spawn processes (ddp_sim: ~30 s on 2 cores) are marked slow."""
    return [
        pytest.param(t, marks=pytest.mark.slow) if "spawn" in (CONF / "trainer" / f"{t}.yaml").read_text() else t
        for t in options("trainer")
    ]


@pytest.mark.parametrize("trainer", trainer_options())
def test_trainer_runs_with_every_logger_at_once(make_cfg, monkeypatch, tmp_path, trainer):
    """``logger=[all options]``: CSV, TensorBoard and W&B (offline) together, default callbacks, test after fit."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    loggers = f"logger=[{','.join(options('logger'))}]"
    over = [*TINY_RUN, f"trainer={trainer}", loggers, "callbacks=default", "callbacks.progress_bar=null"]
    over += ["trainer.log_every_n_steps=1"]
    cfg = make_cfg(over, tiny=False)
    try:
        check_hardware(cfg)
    except ValueError as err:  # refused as it should be; nothing else to run on this machine
        assert str(err).startswith(f"trainer={trainer} needs") and "trainer=ddp_sim" in str(err)
        return
    if cfg.trainer.get("strategy") == "ddp":
        pytest.skip("plain ddp restarts the script once per GPU: run it from the command line on a multi-GPU machine")
    if "ModelParallelStrategy" in str(cfg.trainer.get("strategy")):
        pytest.skip(
            "FSDP2 (ModelParallelStrategy) re-runs the command line for rank 1, which in-process would re-run "
            "pytest: tests/modules/test_fsdp.py::test_cli_trainer_fsdp_sim runs it from src/train.py"
        )
    metrics, objects = train(cfg)
    finite(metrics, "val/loss", "val/acc", "test/loss", "test/acc")
    out = Path(cfg.paths.output_dir)
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"epoch_000.ckpt", "last.ckpt"}
    # CSV: one table with the training, validation and test columns, whatever process wrote them.
    (table,) = out.glob("csv/version_*/metrics.csv")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/loss_step", "train/loss_epoch", "val/loss", "test/loss"):
        assert any(row.get(key) for row in rows), f"{key} missing from {table}"
    assert any(key.startswith("lr-") for key in rows[0]), "lr_monitor logs the learning rate (there is a logger)"
    # TensorBoard: fit and test in the same version folder.
    assert [p.name for p in (out / "tensorboard").iterdir()] == ["version_0"]
    assert list((out / "tensorboard" / "version_0").glob("events.out.tfevents.*"))
    # W&B: one offline run, finished so that the next run of a sweep starts its own.
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    import wandb

    assert wandb.run is None
    if spawns(cfg):
        assert objects["trainer"].world_size == 2


@pytest.mark.parametrize("logger", options("logger"))
def test_logger_option_runs(make_cfg, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg([*TINY_RUN, f"logger={logger}"], tiny=False)
    metrics, objects = train(cfg)
    finite(metrics, "val/loss", "test/loss")
    assert len(objects["logger"]) == len(cfg.get("logger") or {})
    for lg in objects["logger"]:
        assert Path(lg.save_dir or lg.log_dir).is_relative_to(cfg.paths.output_dir)


# ---------------------------------------------------------------------------------- callbacks, debug, experiments


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_option_runs_without_a_logger(make_cfg, callbacks):
    cfg = make_cfg([*TINY_RUN, f"callbacks={callbacks}", "logger=none"], tiny=False)
    metrics, objects = train(cfg)
    finite(metrics, "val/loss", "test/loss")
    names = [type(c).__name__ for c in objects["callbacks"]]
    assert "LearningRateMonitor" not in names  # needs a logger: stepped aside
    if "model_checkpoint" in (cfg.callbacks or {}):
        assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("debug", options("debug"))
def test_debug_option_runs(make_cfg, debug):
    cfg = make_cfg([*TINY_RUN, f"debug={debug}", "trainer.max_epochs=1"], tiny=False)
    metrics, objects = train(cfg)
    finite(metrics, "val/loss", "test/loss")
    assert objects["trainer"].max_epochs == 1 and not objects["logger"]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_runs_or_says_what_it_needs(make_cfg, monkeypatch, experiment):
    """As configured, on this machine; and as a CPU fast_dev_run (``debug=fast_dev_run``)."""
    cfg = make_cfg([f"experiment={experiment}"], tiny=False)
    try:
        check_hardware(cfg)
    except ValueError as err:
        assert f"trainer={HydraConfig.get().runtime.choices.trainer} needs" in str(err)
    cfg = make_cfg([f"experiment={experiment}", "debug=fast_dev_run"], tiny=False)
    if needs_download(cfg):
        assert_stops_before_the_model(cfg, monkeypatch)
        return
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    finite(metrics, "val/loss", "test/loss")
