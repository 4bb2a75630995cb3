"""Save and requeue a SLURM job on its time-limit (or preemption) signal, at an optimizer-step boundary."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

__all__ = ["SlurmRequeue", "Requeued", "slurm_job_id"]

log = logging.getLogger(__name__)


class Requeued(SystemExit):
    """Raised on every rank after the checkpoint is saved and the job requeued: ends this job's run."""


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def _signal_number(name: str | int) -> signal.Signals:
    try:
        if isinstance(name, str) and not name.isdigit():
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(int(name))
    except (KeyError, ValueError):
        raise ValueError(
            f"Invalid signal: {name!r} (expected a signal name such as USR1 or SIGUSR1, or its number)"
        ) from None


class SlurmRequeue(L.Callback):
    """Under SLURM, on ``signal``: save ``hpc_ckpt_<n>.ckpt`` at the next optimizer-step boundary, requeue, exit.

    Ask SLURM for the signal before the time limit (``#SBATCH --signal=USR1@120``: SIGUSR1 to every
    task 120 s before the end). When it arrives, the handler only notes it; after the optimizer step
    in progress (all micro-batches of its accumulation window), every rank agrees (one all-reduce per
    batch while SLURM is detected), the trainer saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` through
    the run's checkpoint path (the module's ``on_save_checkpoint`` with the Hessian refresher's state,
    atomic writes; older ``hpc_ckpt_*`` files are removed), rank 0 calls ``scontrol requeue <job>``,
    and every rank raises :class:`Requeued` (loggers are finalized on the way out). The requeued job
    runs the same command: Lightning's ``Trainer.fit`` finds the newest ``hpc_ckpt_*.ckpt`` in
    ``default_root_dir`` under SLURM and resumes from it (``weights_only`` as the run), so
    ``default_root_dir`` (``paths.output_dir``, i.e. ``hydra.run.dir``) must be the same for both
    jobs: set ``hydra.run.dir=.../slurm_${SLURM_JOB_ID}`` (see ``scripts/slurm_train.sbatch``). A
    warning says so when the folder does not name the job.

    This replaces Lightning's own requeue handler (``SLURMEnvironment(auto_requeue=True)``), which
    saves inside the signal handler, i.e. at any point of a step (between backward and the optimizer
    step, say), and marks W&B runs finished; it is not installed when this callback's handler is.

    A no-op outside SLURM (``SLURMEnvironment.detect()``: ``SLURM_NTASKS`` set, job name not
    ``bash``/``interactive``), and when ``enabled`` is false.

    Args:
        signal: the requeue signal (name or number); SLURM's ``--signal`` must send the same.
        requeue: call ``scontrol requeue`` (false: only save and exit, e.g. where SLURM requeues
            preempted jobs itself).
        enabled: false turns the callback off.
    """

    def __init__(self, signal: str | int = "SIGUSR1", requeue: bool = True, enabled: bool = True):
        self.signum = _signal_number(signal)
        if not isinstance(requeue, bool) or not isinstance(enabled, bool):
            raise ValueError(f"Invalid requeue/enabled: {requeue!r}/{enabled!r} (expected true or false)")
        self.requeue = requeue
        self.enabled = enabled
        self.received = False
        self._exit = False
        self._active = False
        self._previous = None

    # ------------------------------------------------------------------ signal
    def _handler(self, signum, frame) -> None:
        self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs before Lightning registers its signal handlers, which leave an existing one in place.
        if stage != "fit" or not self.enabled or not SLURMEnvironment.detect():
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("SlurmRequeue: not in the main thread, cannot handle %s", self.signum.name)
            return
        self._previous = signal.signal(self.signum, self._handler)
        self._active = True
        self.received = self._exit = False
        job = slurm_job_id() or ""
        if trainer.is_global_zero and job and job not in Path(trainer.default_root_dir).name:
            log.warning(
                "SLURM job %s writes to %s, a folder that does not name the job: after a requeue the job starts "
                "in a new folder and does not find its checkpoint. Set hydra.run.dir=logs/train/runs/slurm_"
                "${SLURM_JOB_ID} (see scripts/slurm_train.sbatch).",
                job,
                trainer.default_root_dir,
            )
        log.info(
            "SLURM requeue on %s enabled (checkpoints: %s/hpc_ckpt_*.ckpt)", self.signum.name, trainer.default_root_dir
        )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._active = False

    # ------------------------------------------------------------------ save and requeue
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        received = trainer.strategy.reduce_boolean_decision(self.received, all=False)
        if not received or getattr(pl_module, "_micro", 0):  # inside an accumulation window: wait for its step
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: save after the first step of the next epoch (a mid-epoch resume)
        path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        log.info("Requeue signal: saving %s at optimizer step %d", path, trainer.global_step)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            for old in path.parent.glob("hpc_ckpt_*.ckpt"):
                if old != path:
                    old.unlink(missing_ok=True)
            if self.requeue:
                self._scontrol_requeue()
        trainer.strategy.barrier("slurm_requeue")
        self._exit = True  # at the next hook: Lightning first logs this step's metrics

    def _exit_if_saved(self) -> None:
        if self._exit:
            raise Requeued(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._exit_if_saved()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._exit_if_saved()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._exit_if_saved()

    def on_train_end(self, trainer, pl_module) -> None:
        self._exit_if_saved()

    @staticmethod
    def _scontrol_requeue() -> None:
        job = slurm_job_id()
        if not job or not re.fullmatch(r"[0-9_]+", job):
            log.error("Cannot requeue: SLURM job id %r", job)
            return
        try:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            log.error("Cannot requeue job %s: scontrol not found on PATH", job)
            return
        if result.returncode == 0:
            log.info("Requeued SLURM job %s", job)
        else:
            log.error("scontrol requeue %s failed (%d): %s", job, result.returncode, result.stderr.strip())
