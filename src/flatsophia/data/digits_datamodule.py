"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from flatsophia.checks import check_int

from ._base import TensorSplitsDataModule, check_declared, split_indices

__all__ = ["DigitsDataModule"]


class DigitsDataModule(TensorSplitsDataModule):
    """Images ``x`` of shape ``(1, 8, 8)`` scaled to [0, 1], labels in ``0..9``.

    The 1797 images are split at random (``split_seed``) into ``n_test`` test, ``n_val``
    validation and the rest (1257 by default) training images.

    Args:
        batch_size, eval_batch_size, num_workers, pin_memory: ``DataLoader`` options.
        n_val: validation images (default 180).
        n_test: test images (default 360).
        split_seed: seed of the split.
        kind, num_classes, input_shape: declared for the model configs; checked (``image_size`` and
            ``in_chans``, read by older configs, too).
    """

    kind = "image"
    task = "classification"

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = 512,
        n_val: int = 180,
        n_test: int = 360,
        split_seed: int = 0,
        num_classes: int | None = 10,
        image_size: int | None = 8,
        in_chans: int | None = 1,
        input_shape: list[int] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_dir: str | None = None,
        kind: str | None = "image",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, split_seed)
        self.n_val = check_int("data.n_val", n_val, 0)
        self.n_test = check_int("data.n_test", n_test, 0)
        if n_val + n_test >= 1797:
            raise ValueError(f"Invalid data.n_val + data.n_test: {n_val + n_test} (the dataset has 1797 images)")
        self.num_classes = 10
        self.input_shape = (1, 8, 8)
        check_declared("kind", kind, self.kind)
        check_declared("num_classes", num_classes, 10)
        check_declared("image_size", image_size, 8)
        check_declared("in_chans", in_chans, 1)
        check_declared("input_shape", input_shape, self.input_shape)
        self.data_dir = data_dir  # unused: the data ship with scikit-learn

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
        n = len(y)
        test_idx, val_idx, train_idx = split_indices(
            n, [self.n_test, self.n_val, n - self.n_test - self.n_val], self.split_seed
        )
        self.data_train = TensorDataset(x[train_idx], y[train_idx])
        self.data_val = TensorDataset(x[val_idx], y[val_idx])
        self.data_test = TensorDataset(x[test_idx], y[test_idx])
