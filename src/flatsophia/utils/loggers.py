"""Lightning's CSV and W&B loggers with two fixes the template needs.

:class:`WandbLogger` starts its W&B run with secrets in the command line replaced by ``***``
(W&B records ``sys.argv`` in the run's metadata; see ``flatsophia.security``).

:class:`CSVLogger` keeps working when the ranks of ``ddp_spawn`` write the file (``trainer=ddp_sim``).

Lightning's ``CSVLogger`` remembers the columns of ``metrics.csv`` in the memory of its writer. Under
``ddp_spawn`` every ``fit``/``test`` runs in freshly spawned processes, each with a pickled copy of
the main process's logger, so the copy that writes the test metrics has never seen the columns the
training processes wrote: it takes the file's columns for new, rewrites the file with its own
header only (``epoch, step, test/*``) and fails on the first training row (``ValueError: dict
contains fields not in fieldnames``), leaving the file truncated. A writer made in a process that
finds the file already there also deleted it. :class:`CSVLogger` reads the header from the file
instead, so every process appends to the same table, whatever process wrote it before.
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import csv_logs
from lightning.pytorch.loggers import wandb as wandb_logs
from lightning.pytorch.loggers.logger import rank_zero_experiment

from flatsophia.security import redacted_argv

__all__ = ["CSVLogger", "WandbLogger"]


class _ContinuingWriter(csv_logs.ExperimentWriter):
    """Lightning's writer, taking the columns of an existing ``metrics.csv`` as its own."""

    def _check_log_dir_exists(self) -> None:
        """Keep an existing ``metrics.csv``: another process of this run (a DDP spawn) wrote it."""

    def _record_new_keys(self) -> set[str]:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys.extend(key for key in header if key not in self.metrics_keys)
        return super()._record_new_keys()


class CSVLogger(csv_logs.CSVLogger):
    """``lightning.pytorch.loggers.CSVLogger`` (same arguments) whose ``metrics.csv`` survives ``ddp_spawn``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


class WandbLogger(wandb_logs.WandbLogger):
    """``lightning.pytorch.loggers.WandbLogger`` (same arguments) that keeps secrets of the command line
    (a ``*_KEY``/``*_TOKEN`` value passed as an override) out of the W&B run's recorded arguments."""

    @property
    def experiment(self):
        with redacted_argv():
            return super().experiment
