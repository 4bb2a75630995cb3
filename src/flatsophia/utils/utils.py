"""Run-level helpers: ``extras`` before a run, the task wrapper around it, metric lookup."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from .rich_utils import print_config_tree

log = logging.getLogger(__name__)

__all__ = ["extras", "task_wrapper", "get_metric_value", "finish_wandb", "metric_sweeper"]


def extras(cfg: DictConfig) -> None:
    """Apply ``cfg.extras``: ``ignore_warnings``, ``enforce_tags`` (non-interactive) and ``print_config``."""
    extra = cfg.get("extras")
    if not extra:
        return
    if extra.get("ignore_warnings"):
        log.info("Disabling python warnings (extras.ignore_warnings=True)")
        warnings.filterwarnings("ignore")
    if extra.get("enforce_tags") and not cfg.get("tags"):
        raise ValueError(
            "No tags given and extras.enforce_tags=True: pass tags, e.g. tags='[sophia,mnist1d]', "
            "or set extras.enforce_tags=false"
        )
    if extra.get("print_config"):
        print_config_tree(cfg, resolve=True, save_to_file=True)


def finish_wandb() -> None:
    """Close the active W&B run, if any, so the next run of a multirun starts its own."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency
        return
    if wandb.run is not None:
        log.info("Closing the W&B run")
        wandb.finish()


def task_wrapper(task: Callable[[DictConfig], tuple[dict, dict]]) -> Callable[[DictConfig], tuple[dict, dict]]:
    """Wrap ``train``/``evaluate``: log a failure with the output dir, and always close W&B.

    Multirun-safe: whatever happens in one run, the W&B run is finished before the next starts.
    """

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> tuple[dict, dict]:
        try:
            return task(cfg)
        except Exception:
            log.exception("Run failed")
            raise
        finally:
            try:
                log.info("Output dir: %s", cfg.paths.output_dir)
            except Exception:  # no paths node, or no Hydra app to resolve ${hydra:...}
                pass
            finish_wandb()

    return wrapped


def metric_sweeper() -> str | None:
    """The sweeper of this multirun that optimises the returned metric (e.g. ``"OptunaSweeper"``).

    ``None`` for a single run and for Hydra's basic sweeper, which ignore the returned value.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    target = str((hydra_cfg.get("sweeper") or {}).get("_target_") or "")
    if hydra_cfg.mode != RunMode.MULTIRUN or not target or target.endswith(".BasicSweeper"):
        return None
    return target.rsplit(".", 1)[-1]


def get_metric_value(metric_dict: dict[str, Any], metric_name: str | None) -> float | None:
    """The value of ``metric_name`` in ``metric_dict`` as a float (``None`` if no name is given).

    A metric that was not logged is an error only where a sweeper optimises it (see
    :func:`metric_sweeper`); elsewhere a warning, and ``None``.
    """
    if not metric_name:
        log.info("No optimized_metric given; returning None")
        return None
    if metric_name not in metric_dict:
        logged = ", ".join(sorted(metric_dict)) or "none"
        sweeper = metric_sweeper()
        if sweeper:
            raise ValueError(
                f"The {sweeper} sweeper optimises optimized_metric={metric_name}, which this run did not log "
                f"(logged: {logged}). "
                "Set optimized_metric to one of these, and check that validation runs (trainer.limit_val_batches)."
            )
        log.warning("optimized_metric=%s was not logged (logged: %s); only a sweeper needs it", metric_name, logged)
        return None
    value = metric_dict[metric_name]
    return float(value.item() if hasattr(value, "item") else value)
