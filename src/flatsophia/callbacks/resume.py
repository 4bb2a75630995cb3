"""Exact resume mid-epoch: the training loader's position in a checkpoint (see ``flatsophia.data.resumable``)."""

from __future__ import annotations

import lightning as L
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful

from flatsophia.data.resumable import ResumableDataLoader

__all__ = ["ExactResume"]


class ExactResume(L.Callback):
    """Write the batches consumed in the current epoch into the saved state of a :class:`ResumableDataLoader`.

    Lightning stores each stateful training loader's ``state_dict()`` in the checkpoint (under
    ``loops.fit_loop.state_dict.combined_loader``); the loader cannot count the batches the run has
    consumed itself, since Lightning's fetcher draws one ahead. This callback adds Lightning's own
    count (``batches``; ``0`` when the epoch is complete), so that a resumed fit draws the same
    batches as a run never stopped. The training function adds it to every run (like
    :class:`ValidateAtMaxSteps`); it changes nothing while training.

    On resume it also makes sure the saved loader state is used: Lightning hands it to the loader
    only when it builds the training loader after restoring the checkpoint, but the module builds it
    earlier (``trainer.estimated_stepping_batches``, for the schedule's length, in
    ``configure_optimizers``), so the first iterator was already made from scratch. At
    ``on_train_start`` (after the restore, before the first batch) the state is loaded and the
    iterator made again. That is done for every training loader, stateful or not: a loader that
    starts each iterator at the position the restored progress gives (``data=tokens``) needs the
    new iterator as well.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        if fit_loop.restarting and fit_loop._data_fetcher is not None:
            if fit_loop._combined_loader_states_to_load:
                fit_loop._load_combined_loader_states()
            for dl in fit_loop._combined_loader.flattened:  # the epoch's order (DistributedSampler: seed + epoch)
                _set_sampler_epoch(dl, fit_loop.epoch_progress.current.processed)
            iter(fit_loop._data_fetcher)  # a new iterator from the loaded state (and its look-ahead batch)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loader = trainer.fit_loop._combined_loader
        states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        if loader is None or not states:
            return
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = processed >= trainer.num_training_batches
        stateful = [dl for dl in loader.flattened if isinstance(dl, _Stateful)]  # as Lightning saves them
        for dl, state in zip(stateful, states):
            if isinstance(dl, ResumableDataLoader):
                state["batches"] = 0 if done else int(processed)
