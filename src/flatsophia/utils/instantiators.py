"""Build Lightning callbacks and loggers from their config groups."""

from __future__ import annotations

import logging

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["instantiate_callbacks", "instantiate_loggers"]


def _instantiate_all(cfg: DictConfig | None, kind: str) -> list:
    """Instantiate every entry of ``cfg`` that has a ``_target_`` (``null`` entries are skipped)."""
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
        log.info("Instantiating %s <%s>", kind, conf._target_)
        out.append(hydra.utils.instantiate(conf))
    return out


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """The callbacks of ``cfg.callbacks`` (a mapping name -> config)."""
    return _instantiate_all(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """The loggers of ``cfg.logger`` (a mapping name -> config)."""
    return _instantiate_all(cfg, "logger")
