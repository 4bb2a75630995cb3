"""A callback for the simulated-preemption test: the process sends itself a signal after optimizer step ``step``."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Only on rank ``rank`` (the other ranks learn of it from the requeue callback's all-reduce)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1", rank: int = 0):
        self.step = step
        self.signum = signal.Signals[signal_name]
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), self.signum)
