"""Save at an optimizer-step boundary and stop (requeued under SLURM) on a time-limit signal or SIGTERM."""

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
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["SlurmRequeue", "Requeued", "Terminated", "slurm_job_id", "submitit_signal"]

log = logging.getLogger(__name__)


class Requeued(SystemExit):
    """Raised on every rank after the checkpoint is saved and the job requeued: ends this job's run."""


class Terminated(SIGTERMException):
    """Raised on every rank after SIGTERM's checkpoint is saved: exit status 143 (128 + SIGTERM).

    A :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException`, as Lightning raises on SIGTERM.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def submitit_signal() -> signal.Signals | None:
    """In a job started by submitit (``hydra/launcher=submitit_slurm``): its preemption/timeout signal
    (``SUBMITIT_PREEMPT_SIGNAL``, default USR2), else ``None``."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return _signal_number(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _signal_number(name: str | int) -> signal.Signals:
    try:
        if isinstance(name, str) and not name.isdigit():
            return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
        return signal.Signals(int(name))
    except (KeyError, ValueError):
        raise ValueError(
            f"Invalid signal: {name!r} (expected a signal name such as USR1 or SIGUSR1, or its number)"
        ) from None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class SlurmRequeue(L.Callback):
    """On a requeue signal or SIGTERM: save ``hpc_ckpt_<n>.ckpt`` at the next optimizer-step boundary, requeue, exit.

    Signals handled:

    * ``signal`` (SIGUSR1), under SLURM: the time-limit signal (``#SBATCH --signal=USR1@120``: SIGUSR1
      to every task 120 s before the end). Saves, ``scontrol requeue <job>``, exits with status 0.
    * SIGTERM (``sigterm``), everywhere: preemption by SLURM without ``--signal``, ``scancel
      --signal=TERM``, Kubernetes, spot instances (SIGTERM, then SIGKILL after a grace period). Saves,
      requeues as above under SLURM (when ``requeue``), exits with status 143 (``Terminated``, a
      Lightning ``SIGTERMException``) so that a scheduler that restarts failed jobs restarts it.
    * submitit's signal (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise), in jobs started by
      submitit (``hydra/launcher=submitit_slurm``): saves, then hands over to submitit's own handler,
      which resubmits the job (the launcher's ``checkpoint()``: the same task, the same run folder) and
      exits; after SIGTERM in such a job, submitit's handler requeues too.

    When a signal arrives, the handler only notes it; after the optimizer step in progress (all
    micro-batches of its accumulation window), every rank agrees (one all-reduce per optimizer step),
    the trainer saves ``<default_root_dir>/hpc_ckpt_<n>.ckpt`` through the run's checkpoint path (the
    module's ``on_save_checkpoint`` with the Hessian refresher's state, atomic writes; older
    ``hpc_ckpt_*`` files are removed), the job is requeued (rank 0), and every rank exits (loggers are
    finalized on the way out). A signal at an epoch's last batch is served after the first step of
    the next epoch. The next run of the same command in the same folder resumes from the newest
    ``hpc_ckpt_*.ckpt`` (``flatsophia.training.train``), so ``default_root_dir`` (``paths.output_dir``,
    i.e. ``hydra.run.dir``) must be the same: under SLURM set ``hydra.run.dir=.../slurm_${SLURM_JOB_ID}``
    (see ``scripts/slurm_train.sbatch``); a warning says so when the folder does not name the job.

    The requeue signal's handler replaces Lightning's own (``SLURMEnvironment(auto_requeue=True)``),
    which saves inside the signal handler, i.e. at any point of a step (between backward and the
    optimizer step, say), and marks W&B runs finished. The SIGTERM handler, installed when training
    starts, replaces Lightning's, which stops after the current micro-batch (inside an accumulation
    window) and broadcasts from inside the handler.

    ``enabled`` false turns the callback off.

    Args:
        signal: the requeue signal (name or number); SLURM's ``--signal`` must send the same.
        requeue: call ``scontrol requeue`` under SLURM (false: only save and exit, e.g. where SLURM
            requeues preempted jobs itself).
        enabled: false turns the callback off.
        sigterm: also save and exit on SIGTERM (false: leave SIGTERM to Lightning).
    """

    def __init__(self, signal: str | int = "SIGUSR1", requeue: bool = True, enabled: bool = True, sigterm: bool = True):
        self.signum = _signal_number(signal)
        for name, value in (("requeue", requeue), ("enabled", enabled), ("sigterm", sigterm)):
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: {value!r} (expected true or false)")
        self.requeue = requeue
        self.enabled = enabled
        self.sigterm = sigterm
        self.received = False  # a requeue signal (SLURM's or submitit's)
        self.terminated = False  # SIGTERM
        self._exit: str | None = None  # "requeue" or "sigterm" once saved
        self._installed: dict[signal.Signals, object] = {}  # signal -> the handler before ours
        self._sigterm_before_fit = None
        self._submitit: tuple[signal.Signals, object] | None = None  # submitit's signal and handler
        self._slurm = False

    # ------------------------------------------------------------------ signals
    def _handler(self, signum, frame) -> None:
        self.received = True

    def _sigterm_handler(self, signum, frame) -> None:
        self.terminated = True

    def _install(self, signum: signal.Signals, handler) -> object:
        previous = signal.signal(signum, handler)
        self._installed.setdefault(signum, previous)
        return previous

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs before Lightning registers its signal handlers, which leave an existing requeue handler in place.
        self.received = self.terminated = False
        self._exit = None
        self._installed, self._submitit = {}, None
        if stage != "fit" or not self.enabled:
            return
        if not _main_thread():
            log.warning("SlurmRequeue: not in the main thread, cannot handle signals")
            return
        self._slurm = SLURMEnvironment.detect()
        self._sigterm_before_fit = signal.getsignal(signal.SIGTERM)
        if self._slurm:
            self._install(self.signum, self._handler)
            self._warn_folder(trainer)
        sub = submitit_signal()
        if sub is not None:
            self._install(sub, self._handler)
            previous = self._installed[sub]  # submitit's, also when ``signal`` is the same signal
            if callable(previous) and previous != self._handler:
                self._submitit = (sub, previous)
        handled = [s.name for s in self._installed] + (["SIGTERM"] if self.sigterm else [])
        if handled:
            log.info(
                "On %s: save %s/hpc_ckpt_*.ckpt at the next optimizer step and stop",
                "/".join(handled),
                trainer.default_root_dir,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning registered its SIGTERM handler (in Trainer._run): replace it.
        if self.enabled and self.sigterm and _main_thread():
            signal.signal(signal.SIGTERM, self._sigterm_handler)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not _main_thread():
            return
        for signum, previous in self._installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._installed = {}
        # Lightning's teardown restores the handler SIGTERM had before fit; make sure of it.
        if signal.getsignal(signal.SIGTERM) == self._sigterm_handler:
            before = self._sigterm_before_fit
            signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)

    def _warn_folder(self, trainer: L.Trainer) -> None:
        job = slurm_job_id() or ""
        if trainer.is_global_zero and job and job not in Path(trainer.default_root_dir).name and not submitit_signal():
            log.warning(
                "SLURM job %s writes to %s, a folder that does not name the job: after a requeue the job starts "
                "in a new folder and does not find its checkpoint. Set hydra.run.dir=logs/train/runs/slurm_"
                "${SLURM_JOB_ID} (see scripts/slurm_train.sbatch).",
                job,
                trainer.default_root_dir,
            )

    # ------------------------------------------------------------------ save and requeue
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.enabled or self._exit:
            return
        if getattr(pl_module, "_micro", 0):  # inside an accumulation window: wait for its step
            return
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last batch: save after the first step of the next epoch (a mid-epoch resume)
        decide = trainer.strategy.reduce_boolean_decision
        if not decide(self.received or self.terminated, all=False):  # any rank
            return
        sigterm = decide(self.terminated, all=False)
        path = Path(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        log.info(
            "%s: saving %s at optimizer step %d",
            "SIGTERM" if sigterm else "Requeue signal",
            path,
            trainer.global_step,
        )
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            for old in path.parent.glob("hpc_ckpt_*.ckpt"):
                if old != path:
                    old.unlink(missing_ok=True)
            if self._slurm and self.requeue and self._submitit is None:
                self._scontrol_requeue()
        trainer.strategy.barrier("slurm_requeue")
        self._exit = "sigterm" if sigterm else "requeue"  # at the next hook: Lightning first logs this step's metrics

    def _exit_if_saved(self, trainer: L.Trainer) -> None:
        if not self._exit:
            return
        if self._submitit is not None and trainer.is_global_zero:
            signum, handler = self._submitit
            handler(signum, None)  # submitit resubmits the task (same folder) and exits
        raise Terminated() if self._exit == "sigterm" else Requeued(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._exit_if_saved(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._exit_if_saved(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._exit_if_saved(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._exit_if_saved(trainer)

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
