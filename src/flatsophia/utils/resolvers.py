"""OmegaConf resolvers used by the configs.

- ``${wandb_offline:}``: ``true`` unless W&B can log online, i.e. ``WANDB_MODE`` is not
  ``online`` and no ``WANDB_API_KEY`` is set (also ``true`` for ``WANDB_MODE=offline|disabled``).
  Lets ``logger=wandb`` run on machines without credentials or network.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "wandb_offline"]


def wandb_offline() -> bool:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "online":
        return False
    if mode in ("offline", "disabled", "dryrun"):
        return True
    return not os.environ.get("WANDB_API_KEY")


def register_resolvers() -> None:
    """Register the resolvers (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
