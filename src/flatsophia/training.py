"""``train(cfg)`` and ``evaluate(cfg)``: plain functions, called by ``src/train.py``/``src/eval.py`` and the tests.

Both take the composed Hydra config (``conf/train.yaml`` / ``conf/eval.yaml``), build everything with
``hydra.utils.instantiate`` and return ``(metrics, objects)``: the logged metrics as floats and the
built objects (``cfg``, ``datamodule``, ``model``, ``callbacks``, ``logger``, ``trainer``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from flatsophia.callbacks import ExactResume, ValidateAtMaxSteps
from flatsophia.security import UntrustedCheckpointError, load_checkpoint_file, use_atomic_checkpoint_io
from flatsophia.utils import (
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    task_wrapper,
)
from flatsophia.validation import validate_config

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "load_checkpoint", "build_module"]


def _to_container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule, **overrides) -> L.LightningModule:
    """The LightningModule of ``cfg.module`` with the network, optimizer factory, schedule and Hessian blocks.

    ``task`` and ``num_classes`` come from the datamodule; ``overrides`` replace ``cfg.module`` keys.
    """
    kwargs = _to_container(cfg.get("module")) or {}
    target = kwargs.pop("_target_", "flatsophia.modules.optim_module.OptimLitModule")
    kwargs.update(overrides)
    cls = hydra.utils.get_class(target)
    log.info("Instantiating model <%s>", cfg.model.get("_target_"))
    net = hydra.utils.instantiate(cfg.model)
    # Plain lists/dicts in the factory's kwargs (recorded in checkpoints) even without `_convert_: all`:
    # checkpoints stay loadable with weights_only=True.
    optimizer = hydra.utils.instantiate(cfg.optimizer, _convert_="all")
    log.info("Instantiating module <%s> with optimizer <%s>", target, cfg.optimizer.get("_target_"))
    return cls(
        net=net,
        optimizer=optimizer,
        scheduler=_to_container(cfg.get("scheduler")),
        hessian=_to_container(cfg.get("hessian")),
        task=datamodule.task,
        num_classes=datamodule.num_classes,
        **kwargs,
    )


def _build_common(cfg: DictConfig, **module_overrides) -> dict[str, Any]:
    validate_config(cfg)  # every bad value named before anything is built
    threads = cfg.get("torch_num_threads")
    if threads:
        torch.set_num_threads(int(threads))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    if hasattr(datamodule, "check_available"):
        datamodule.check_available()  # missing files (download=false) stop the run before the model is built
    model = build_module(cfg, datamodule, **module_overrides)
    loggers = instantiate_loggers(cfg.get("logger"))
    callbacks = instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    # ValidateAtMaxSteps: a run stopped by max_steps inside an epoch validates before it ends.
    # ExactResume: checkpoints record the training loader's position (a resumed fit continues exactly).
    callbacks_all = [*callbacks, ValidateAtMaxSteps(), ExactResume()]
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks_all, logger=loggers or False)
    use_atomic_checkpoint_io(trainer)  # checkpoints written to a temp file and renamed: no half-written last.ckpt
    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "callbacks": callbacks,
        "logger": loggers,
        "trainer": trainer,
    }
    if loggers:
        log_hyperparameters(objects)
    return objects


def _ckpt_trusted(cfg: DictConfig) -> bool:
    trusted = cfg.get("ckpt_trusted", False)
    if not isinstance(trusted, bool):
        raise ValueError(f"Invalid ckpt_trusted: {trusted!r} (expected true or false)")
    return trusted


def _metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        out[key] = float(value.item()) if isinstance(value, torch.Tensor) else float(value)
    return out


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit on the train split (validating on val), then test the best checkpoint.

    Config keys read: ``seed``, ``data``, ``model``, ``optimizer``, ``scheduler``, ``hessian``,
    ``module``, ``callbacks``, ``logger``, ``trainer``, ``train``, ``test``, ``test_final``, ``ckpt_path`` (resume),
    ``ckpt_trusted``.
    """
    weights_only = not _ckpt_trusted(cfg)
    objects = _build_common(cfg)
    trainer, model, datamodule = objects["trainer"], objects["model"], objects["datamodule"]
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        ckpt_path = _requeued_checkpoint(trainer) or cfg.get("ckpt_path")
        if ckpt_path:
            load_checkpoint(ckpt_path, trusted=not weights_only)  # clear error before Lightning's
            log.info("Resuming from %s", ckpt_path)
        log.info("Starting training")
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=weights_only)
        metrics.update(_metrics(trainer))
    if cfg.get("test_final", False):
        metrics.update(_test_final(trainer, model, datamodule))
    if cfg.get("test", False):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best or not Path(best).exists():
            log.warning("No best checkpoint found; testing the current weights")
            best = None
        else:
            log.info("Testing the best checkpoint %s", best)
        trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=weights_only)
        metrics.update(_metrics(trainer))
    return metrics, objects


def _requeued_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest ``hpc_ckpt_<n>.ckpt`` in the run's folder (written by
    :class:`~flatsophia.callbacks.SlurmRequeue` when a requeue signal or SIGTERM stopped the run), else ``None``.

    It wins over ``ckpt_path``: a requeued job (or a run restarted in the same folder) that was started
    from ``ckpt_path`` continues from where it stopped, not from that file again.
    """
    from lightning.fabric.plugins.environments import SLURMEnvironment

    found = trainer._checkpoint_connector._hpc_resume_path
    if found:
        what = "SLURM: resuming the requeued job" if SLURMEnvironment.detect() else "Resuming the interrupted run"
        log.info("%s from %s", what, found)
    return found


def _test_final(trainer: L.Trainer, model, datamodule) -> dict[str, float]:
    """Test the weights as they are at the end of training; log and return them as ``test_final/*``."""
    log.info("Testing the final weights")
    results = trainer.test(model, datamodule=datamodule, ckpt_path=None, verbose=False)
    out = {
        "test_final/" + key.split("/", 1)[-1]: float(value)
        for key, value in (results[0] if results else {}).items()
        if key.startswith("test/")
    }
    for logger in trainer.loggers:
        logger.log_metrics(out, step=trainer.global_step)
        logger.save()
    log.info("Final-weights test metrics: %s", out)
    return out


def load_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """Load a Lightning checkpoint on the CPU, with a clear error if it is missing or unreadable.

    Only tensors and plain data are unpickled (``weights_only=True``); a file holding other Python
    objects raises :class:`~flatsophia.security.UntrustedCheckpointError` before any of it runs.
    ``trusted=True`` (``ckpt_trusted=true``) unpickles it fully, with a warning.
    """
    p = Path(str(path))
    if not p.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {p} (ckpt_path={str(path)!r})")
    try:
        ckpt = load_checkpoint_file(p, trusted=trusted)
    except UntrustedCheckpointError:
        raise
    except Exception as err:
        raise ValueError(f"Checkpoint {p} is corrupt or not a PyTorch checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"Checkpoint {p} is not a Lightning checkpoint (no 'state_dict' entry)")
    return ckpt


@task_wrapper
def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Test the checkpoint ``cfg.ckpt_path`` on the test split of ``cfg.data``.

    ``model`` and ``data`` must match the training run (see that run's ``.hydra/config.yaml``);
    the optimizer name is taken from the checkpoint.
    """
    if not cfg.get("ckpt_path"):
        raise ValueError("ckpt_path is required: python src/eval.py ckpt_path=/path/to/run/checkpoints/last.ckpt")
    weights_only = not _ckpt_trusted(cfg)
    ckpt = load_checkpoint(cfg.ckpt_path, trusted=not weights_only)
    saved = (ckpt.get("flatsophia") or {}).get("optimizer_name")
    objects = _build_common(cfg, **({"optimizer_name": saved} if saved else {}))
    trainer, model, datamodule = objects["trainer"], objects["model"], objects["datamodule"]
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(
            f"Checkpoint {cfg.ckpt_path} does not fit the configured model ({cfg.model._target_}); pass the "
            f"same model=... and model.* overrides as in training (see the run's .hydra/config.yaml). {err}"
        ) from err
    del ckpt
    log.info("Testing checkpoint %s", cfg.ckpt_path)
    trainer.test(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=weights_only)
    return _metrics(trainer), objects
