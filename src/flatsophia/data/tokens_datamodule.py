"""Language modelling on token files (nanoGPT's ``train.bin``/``val.bin``): OpenWebText, FineWeb, ...

Training reads random contiguous windows, as the Sophia/nanoGPT ``get_batch``: each batch draws
``batch_size x world_size`` start offsets from a generator keyed by ``(seed, batch index)``
(:func:`~flatsophia.data.token_files.batch_offsets`) and rank ``r`` takes the ``r``-th
``batch_size`` of them. So the windows are a pure function of (seed, rank, world size, batch
index): ranks read different windows without communicating, 2 ranks x batch B read the windows of
1 rank x batch 2B, and a resumed run reads the windows it would have read: the batch index is
saved in checkpoints (:meth:`TokensDataModule.state_dict`) and the stream restarts there.

Validation reads a fixed set of ``eval_iters x eval_batch_size`` windows of ``val.bin`` drawn with
``split_seed`` (not the run's seed), the same for every run, so val/loss is comparable across runs
and optimizers; Lightning splits them across ranks. Test reads ``test.bin`` if present, else a
second fixed set of ``val.bin`` windows (drawn after the validation ones).

Files are memory-mapped (``np.memmap``), reopened for each training batch, never loaded whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from flatsophia.checks import check_int

from ._base import TensorSplitsDataModule, check_declared
from .resumable import capture_rng, restore_rng
from .token_files import META_FILE, TokenFile, batch_offsets, read_meta, read_windows

__all__ = ["TokensDataModule", "TrainWindows", "FixedWindows"]

log = logging.getLogger(__name__)


class TrainWindows(IterableDataset):
    """One rank's endless stream of training batches ``(x, y)``, each ``(batch_size, block_size)`` int64.

    Batch ``index`` (counted from 0 at the start of training) holds windows
    ``[rank * batch_size, (rank + 1) * batch_size)`` of the ``batch_size * world_size`` windows
    :func:`batch_offsets` gives for ``(seed, index)``. The stream starts at batch ``start``. With
    DataLoader workers, worker ``w`` of ``n`` makes batches ``start + w``, ``start + w + n``, ...,
    which the DataLoader returns in order: the stream does not depend on the number of workers.
    """

    def __init__(
        self,
        file: TokenFile,
        block_size: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ):
        self.file = file
        self.block_size = check_int("data.block_size", block_size, 1)
        self.batch_size = check_int("data.batch_size", batch_size, 1)
        self.seed = check_int("data.seed", seed, 0)
        self.world_size = check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank: {rank!r} (expected an integer in [0, {world_size}))")
        self.rank = rank
        self.start = check_int("start", start, 0)
        file.check_fits(block_size)
        self.n_tokens = file.n_tokens

    def offsets(self, index: int) -> np.ndarray:
        """Start offsets of this rank's windows in batch ``index``."""
        every = batch_offsets(self.seed, index, self.batch_size * self.world_size, self.n_tokens, self.block_size)
        return every[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def batch(self, index: int):
        return read_windows(self.file.open(), self.offsets(index), self.block_size)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers


class _FromPosition(DataLoader):
    """A loader of a :class:`TrainWindows` stream whose every iterator (one per epoch) starts at the
    batches read so far, ``position()``: epoch ``e`` continues the stream where epoch ``e - 1`` left
    it (an epoch bounded by ``limit_train_batches``), and a resumed run continues where the
    checkpoint left it. Workers are started anew for each iterator (not persistent), so they get the
    stream's new start.

    Its ``state_dict`` (which Lightning saves with every checkpoint) holds the RNG streams at the
    checkpoint (:func:`~flatsophia.data.resumable.capture_rng`); the first iterator after a resume
    restores them, so dropout continues as in a run never stopped."""

    def __init__(self, windows: TrainWindows, position, **kwargs):
        super().__init__(windows, **kwargs)
        self._position = position
        self._resume: dict | None = None

    def __iter__(self):
        self.dataset.start = self._position()
        state, self._resume = self._resume, None
        iterator = super().__iter__()  # draws the workers' base seed from the global RNG
        if state is not None:
            restore_rng(state["rng"])  # after it: the streams as at the checkpoint
        return iterator

    def state_dict(self) -> dict:
        return {"rng": capture_rng()}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


class FixedWindows(Dataset):
    """``batches x batch_size`` windows drawn once with ``seed`` (batch indices ``first`` onwards); item ``k``
    is one ``(x, y)`` pair of ``(block_size,)`` tensors."""

    def __init__(self, file: TokenFile, block_size: int, batch_size: int, batches: int, seed: int, first: int = 0):
        file.check_fits(block_size)
        self.file, self.block_size = file, block_size
        n = file.n_tokens
        self.offsets = np.concatenate(
            [batch_offsets(seed, first + j, batch_size, n, block_size) for j in range(batches)]
        )
        self._data = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, k: int):
        if self._data is None:  # opened lazily in each process (workers get an unopened copy)
            self._data = self.file.open()
        x, y = read_windows(self._data, self.offsets[k : k + 1], self.block_size)
        return x[0], y[0]

    def __getstate__(self):
        return {**self.__dict__, "_data": None}


class TokensDataModule(TensorSplitsDataModule):
    """Next-token prediction on the token files of ``data_dir/dataset`` (see :mod:`flatsophia.data.token_files`).

    Train for a number of steps (``trainer.max_steps``): the training stream has no end, so
    epochs never do.

    Args:
        data_dir, dataset: the token folder is ``data_dir/dataset`` (``train.bin``, ``val.bin``,
            ``meta.json``; ``scripts/prepare_tokens.py`` writes them).
        block_size: context length T (tokens per window).
        batch_size: windows per training batch per device (the micro-batch; global batch =
            batch_size x module.accumulate x devices x num_nodes).
        eval_batch_size: windows per validation batch (default ``batch_size``).
        eval_iters: validation batches; ``eval_iters x eval_batch_size`` fixed windows in all.
        seed: seed of the training windows (the run's seed; ``null`` -> 0).
        split_seed: seed of the fixed validation and test windows (the same for every run).
        vocab_size, dtype: what the files hold; ``null`` reads them from ``meta.json`` (set them for
            files without one, e.g. nanoGPT's: 50257, uint16).
        num_classes: the model's vocabulary (logits per position), at least ``vocab_size``; GPT-2's
            50,257 ids are padded to 50,304 (a multiple of 64) as nanoGPT and Sophia do.
        tokens_per_step: the global batch in tokens the run is meant to have (checked against
            batch_size x block_size x accumulate x devices x num_nodes before training); ``null``: unchecked.
        num_workers, pin_memory: ``DataLoader`` options.
        kind, input_shape: declared for the model configs (``tokens``, ``[block_size]``); checked.
    """

    kind = "tokens"
    task = "lm"
    #: The training stream never ends an epoch: runs need ``trainer.max_steps`` (checked by validation).
    endless_train = True

    def __init__(
        self,
        data_dir: str = "data",
        dataset: str = "openwebtext",
        block_size: int = 1024,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        eval_iters: int = 200,
        seed: int | None = 0,
        split_seed: int = 0,
        vocab_size: int | None = None,
        dtype: str | None = None,
        num_classes: int = 50304,
        tokens_per_step: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        kind: str | None = "tokens",
        input_shape: list[int] | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, split_seed)
        self.folder = Path(data_dir) / dataset
        self.block_size = check_int("data.block_size", block_size, 1)
        self.eval_iters = check_int("data.eval_iters", eval_iters, 1)
        self.seed = check_int("data.seed", 0 if seed is None else seed, 0)
        check_int("data.split_seed", split_seed, 0)
        self.num_classes = check_int("data.num_classes", num_classes, 1)
        self.tokens_per_step = check_int("data.tokens_per_step", tokens_per_step, 1, allow_none=True)
        self._given_meta = {"vocab_size": vocab_size, "dtype": dtype}
        self.input_shape = (block_size,)
        check_declared("kind", kind, self.kind)
        check_declared("input_shape", input_shape, self.input_shape)
        self.meta: dict | None = None
        self.files: dict[str, TokenFile] = {}
        self.start_batch = 0  # training batches already read (restored from a checkpoint)

    # ------------------------------------------------------------------ files
    def _check_present(self) -> None:
        missing = [f"{s}.bin" for s in ("train", "val") if not (self.folder / f"{s}.bin").exists()]
        if missing:
            raise FileNotFoundError(
                f"Token files {', '.join(missing)} not found in {self.folder}. Write them with e.g. "
                f"`python scripts/prepare_tokens.py --tokenizer gpt2 --hf-dataset openwebtext --out {self.folder}` "
                "(README: Paper-scale experiments), or point data.data_dir/data.dataset at your folder."
            )
        self._read_meta()

    def _read_meta(self) -> dict:
        if self.meta is None:
            meta = read_meta(self.folder, **self._given_meta)
            vocab = int(meta["vocab_size"])
            if vocab > self.num_classes:
                raise ValueError(
                    f"Invalid data.num_classes: {self.num_classes} (the model's vocabulary) is smaller than the "
                    f"token files' vocab_size {vocab} ({self.folder / META_FILE}); set data.num_classes >= {vocab}"
                )
            self.meta = meta
        return self.meta

    def prepare_data(self) -> None:
        self._check_present()

    def setup(self, stage: str | None = None) -> None:
        if self.files:
            return
        self._check_present()
        dtype = self._read_meta()["dtype"]
        for split in ("train", "val", "test"):
            path = self.folder / f"{split}.bin"
            if path.exists():
                self.files[split] = TokenFile(path, dtype)
        self.files["train"].check_fits(self.block_size)
        val = self.files["val"]
        self.data_val = FixedWindows(val, self.block_size, self.eval_batch_size, self.eval_iters, self.split_seed)
        if "test" in self.files:
            self.data_test = FixedWindows(
                self.files["test"], self.block_size, self.eval_batch_size, self.eval_iters, self.split_seed
            )
        else:  # the next eval_iters batches of the validation stream
            self.data_test = FixedWindows(
                val, self.block_size, self.eval_batch_size, self.eval_iters, self.split_seed, first=self.eval_iters
            )

    # ---------------------------------------------------------------- loaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def train_windows(self, rank: int | None = None, world_size: int | None = None) -> TrainWindows:
        """This process's training stream (rank and world size from the trainer unless given), from
        batch :attr:`start_batch`."""
        if not self.files:
            raise RuntimeError("TokensDataModule.setup() has not been called")
        own_rank, own_world = self._rank_world()
        return TrainWindows(
            self.files["train"],
            self.block_size,
            self.batch_size,
            seed=self.seed,
            rank=own_rank if rank is None else rank,
            world_size=own_world if world_size is None else world_size,
            start=self.start_batch,
        )

    def train_dataloader(self) -> DataLoader:
        return _FromPosition(
            self.train_windows(),
            self._batches_read,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    # ------------------------------------------------------------ checkpoints
    def _batches_read(self) -> int:
        """Training batches consumed so far: Lightning's count of processed training batches (restored
        on resume), or :attr:`start_batch` outside a fit."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self.start_batch
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)

    def state_dict(self) -> dict:
        """Saved in checkpoints by Lightning: the data position and what the stream depends on."""
        _, world = self._rank_world()
        return {
            "train_batches": self._batches_read(),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": world,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restart the training stream where the checkpoint left it (called before the loaders are built)."""
        self.start_batch = int(state.get("train_batches", 0))
        _, world = self._rank_world()
        saved = (state.get("seed"), state.get("batch_size"), state.get("world_size"))
        if saved != (self.seed, self.batch_size, world):
            log.warning(
                "Resuming token windows at batch %d with (seed, batch_size, world_size) = %s; the checkpoint had %s, "
                "so the windows from here on differ from those the interrupted run would have read.",
                self.start_batch, (self.seed, self.batch_size, world), saved,
            )
