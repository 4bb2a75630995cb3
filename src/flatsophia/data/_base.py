"""Shared pieces of the datamodules: tensor-backed splits, seeded split indices, argument checks."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from flatsophia.checks import check_int
from flatsophia.data.resumable import ResumableDataLoader

TASKS = ("classification", "lm")

#: What a dataset gives a model (``data.kind``): 1-D signals ``[L]`` or ``[C, L]``, images ``[C, H, W]``,
#: or token sequences ``[T]`` (int64 ids, next-token targets: the ``lm`` task).
KINDS = ("signal", "image", "tokens")


def check_declared(name: str, given, actual) -> None:
    """Raise if a value the config declares (for models to interpolate) differs from the data's.

    Data configs carry ``kind``, ``input_shape`` and ``num_classes`` so that model configs can read
    them as ``${data.num_classes}``; the datamodule checks them so a wrong edit cannot go unnoticed.
    """
    if given is None:
        return
    if isinstance(actual, (tuple, list)):
        same = isinstance(given, Sequence) and tuple(int(v) for v in given) == tuple(actual)
    else:
        same = given == actual
    if not same:
        raise ValueError(f"Invalid data.{name}: {given!r}; this dataset has {name}={actual!r}")


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Disjoint index sets of the given sizes from a permutation of ``range(n)`` seeded by ``seed``.

    The permutation uses its own ``torch.Generator``, so the split does not depend on (or disturb)
    the global RNG state: the same ``split_seed`` gives the same split in every process.
    """
    if sum(sizes) > n:
        raise ValueError(f"Cannot take splits of sizes {list(sizes)} from {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    out, start = [], 0
    for size in sizes:
        out.append(perm[start : start + size].sort().values)
        start += size
    return out


class TensorSplitsDataModule(L.LightningDataModule):
    """Base class: subclasses fill ``self.data_train/val/test`` in ``setup``; this builds the loaders.

    Attributes every datamodule of the project sets: ``kind`` (one of :data:`KINDS`), ``task``
    (``"classification"``, or ``"lm"`` for token data), ``num_classes`` (classes, or vocabulary size
    for ``lm``) and ``input_shape`` (of one example, without the batch dimension). Batches are
    ``(x, y)`` tuples.

    Datamodules whose files can be missing define ``_check_present()`` (raising
    ``FileNotFoundError`` with what to fetch) and a ``download`` flag; :meth:`check_available` runs
    that check before the model is built.

    ``batch_size`` is per device (process): under DDP the global batch is
    ``batch_size * devices * num_nodes``.
    """

    kind: str = "signal"
    task: str = "classification"
    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        split_seed: int = 0,
    ):
        super().__init__()
        self.batch_size = check_int("data.batch_size", batch_size, 1)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size or batch_size, 1)
        self.num_workers = check_int("data.num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise ValueError(f"Invalid data.split_seed: {split_seed!r} (expected an integer)")
        self.split_seed = split_seed
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None

    def check_available(self) -> None:
        """Raise ``FileNotFoundError`` now if the data files are missing and ``download`` is off.

        Called by the training function right after the datamodule is built, so that a missing
        dataset stops the run before the model is built (Lightning would only find out in
        ``prepare_data``). A no-op for generated or embedded data.
        """
        check = getattr(self, "_check_present", None)
        if check is not None and not getattr(self, "download", False):
            check()

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called")
        # The training loader resumes mid-epoch exactly (flatsophia.data.resumable); it shuffles as DataLoader.
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.data_train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data_val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data_test, train=False)
