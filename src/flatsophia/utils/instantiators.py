"""Build Lightning callbacks and loggers from their config groups."""

from __future__ import annotations

import logging

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["NEEDS_LOGGER", "instantiate_callbacks", "instantiate_loggers"]

#: Callbacks that only write to a logger (Lightning refuses them in a Trainer without one).
NEEDS_LOGGER: tuple[type[Callback], ...] = (LearningRateMonitor, DeviceStatsMonitor)


def _entries(cfg: DictConfig | None, kind: str) -> list[tuple[str, DictConfig]]:
    """The ``(name, config)`` entries of ``cfg`` that have a ``_target_`` (``null`` entries are skipped)."""
    if not cfg:
        log.info("No %s configured", kind)
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"The {kind} config must be a mapping of name -> config; got {type(cfg).__name__}")
    out = []
    for name, conf in cfg.items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{kind}.{name} has no _target_; every {kind} entry needs one (or null to disable it)")
        out.append((name, conf))
    return out


def _instantiate(conf: DictConfig, kind: str):
    log.info("Instantiating %s <%s>", kind, conf._target_)
    return hydra.utils.instantiate(conf)


def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool = True) -> list[Callback]:
    """The callbacks of ``cfg.callbacks`` (a mapping name -> config).

    With ``has_logger=False`` (``logger=none``), callbacks that only write to a logger
    (:data:`NEEDS_LOGGER`, e.g. ``lr_monitor``) step aside, each with one log line, instead of
    stopping the run.
    """
    out = []
    for name, conf in _entries(cfg, "callbacks"):
        if not has_logger:
            target = hydra.utils.get_object(conf._target_)
            if isinstance(target, type) and issubclass(target, NEEDS_LOGGER):
                log.info("Skipping callbacks.%s (%s): it writes to a logger and there is none", name, target.__name__)
                continue
        out.append(_instantiate(conf, "callbacks"))
    return out


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a mapping name -> config), each with its version fixed.

    The version (``version_<n>`` folder of CSV/TensorBoard, run id of W&B) is resolved here, in the
    process that builds the run: under ``ddp_spawn`` (``trainer=ddp_sim``) ``fit`` and ``test`` run
    in separately spawned processes, each with a copy of these loggers, and a copy that resolved it
    itself would take the next free folder (``fit`` in ``version_0``, ``test`` in ``version_1``).
    """
    loggers = [_instantiate(conf, "logger") for _, conf in _entries(cfg, "logger")]
    for logger in loggers:
        _ = logger.version
    return loggers
