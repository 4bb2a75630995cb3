"""OmegaConf resolvers used by the configs.

- ``${wandb_offline:}``: ``true`` unless W&B can log online, i.e. ``WANDB_MODE`` is not
  ``online`` and no ``WANDB_API_KEY`` is set (also ``true`` for ``WANDB_MODE=offline|disabled``).
  Lets ``logger=wandb`` run on machines without credentials or network.
- ``${mul:a,b}``: the product ``a * b`` (e.g. validate every 1000 optimizer steps:
  ``val_check_interval: ${mul:1000,${module.accumulate}}`` training batches).
- ``${slurm_run_id:<output dir>}``: ``null`` outside a SLURM job; inside one, ``<job id>-<8 hex digits
  of the output dir's hash>``. The CSV version and W&B run id of a run, so that a requeued job (same
  job id, same output dir) appends to the same CSV table and resumes the same W&B run, while two runs
  of one allocation (different folders) stay apart.
"""

from __future__ import annotations

import hashlib
import os

from omegaconf import OmegaConf

__all__ = ["register_resolvers", "mul", "slurm_run_id", "wandb_offline"]


def wandb_offline() -> bool:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "online":
        return False
    if mode in ("offline", "disabled", "dryrun"):
        return True
    return not os.environ.get("WANDB_API_KEY")


def mul(a, b):
    """``a * b``; both must be numbers (an int if both are ints)."""
    for value in (a, b):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid argument of ${{mul:...}}: {value!r} (expected a number)")
    return a * b


def slurm_run_id(output_dir: str) -> str | None:
    from flatsophia.callbacks.preemption import slurm_job_id

    job = slurm_job_id()
    if not job:
        return None
    digest = hashlib.sha1(os.path.abspath(str(output_dir)).encode()).hexdigest()[:8]
    return f"{job}-{digest}"


def register_resolvers() -> None:
    """Register the resolvers (idempotent)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", mul)
    if not OmegaConf.has_resolver("slurm_run_id"):
        OmegaConf.register_new_resolver("slurm_run_id", slurm_run_id)
