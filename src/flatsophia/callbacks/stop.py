"""End a run stopped by ``trainer.max_steps`` inside an epoch with a validation, as at an epoch's end."""

from __future__ import annotations

import lightning as L

__all__ = ["ValidateAtMaxSteps"]


class ValidateAtMaxSteps(L.Callback):
    """At ``trainer.max_steps``, stop the way early stopping does, so Lightning validates first.

    Lightning leaves the fit loop as soon as ``global_step`` reaches ``max_steps``; when that happens
    inside an epoch, no validation runs after the last step: ``val/*`` are missing (or stale), no
    checkpoint is written, and the metric returned to a sweeper does not exist. Setting
    ``trainer.should_stop`` on that step instead lets the epoch loop run its validation (and the
    checkpoint callbacks after it) before the run ends. ``trainer.max_time`` gets the same through
    Lightning's ``Timer``, which also stops via ``should_stop``. Both need ``trainer.min_epochs`` unset
    (or met): Lightning does not stop early before ``min_epochs``.

    The training function adds this callback to every run; it changes nothing for runs stopped by
    ``max_epochs``.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
