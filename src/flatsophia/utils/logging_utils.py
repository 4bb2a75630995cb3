"""Send the run's resolved config and model size to every logger."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from flatsophia.security import redact

__all__ = ["log_hyperparameters"]

#: Top-level config nodes not sent to loggers.
SKIP = ("hydra", "paths", "extras")


@rank_zero_only
def log_hyperparameters(object_dict: dict[str, Any]) -> None:
    """Log the whole resolved config plus parameter counts (rank 0 only).

    ``object_dict`` holds ``cfg``, ``model`` (the LightningModule) and ``trainer``.
    """
    trainer = object_dict["trainer"]
    if not trainer.loggers:
        return
    cfg = object_dict["cfg"]
    model = object_dict["model"]
    hparams = {}
    for key in cfg:
        if key not in SKIP:
            node = cfg[key]
            hparams[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    hparams["model/params/total"] = sum(p.numel() for p in model.parameters())
    hparams["model/params/trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hparams = redact(hparams)  # values of *_KEY/*_TOKEN/... environment variables -> ***
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
