"""MNIST-1D (Greydanus 2020): 10 classes of 1-D signals, generated locally in a few seconds.

The data are made with ``mnist1d.data.make_dataset`` (no download; ``get_dataset`` would fetch a
pickle from the web) and cached as ``.npz`` under ``data_dir/mnist1d/``, keyed by a hash of the
generation arguments. The package's own train/test split is kept: ``n_val`` signals of its train
part are held out for validation (chosen by ``split_seed``), and its test part is the test set.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from flatsophia.checks import check_int

from ._base import TensorSplitsDataModule, check_declared, split_indices

__all__ = ["MNIST1DDataModule", "make_mnist1d"]


def _generation_args(num_samples: int, train_split: float, seq_len: int, data_seed: int) -> dict:
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)  # only used by the download path
    args.update(num_samples=num_samples, train_split=train_split, final_seq_length=seq_len, seed=data_seed)
    return args


def make_mnist1d(args: dict, cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with ``args`` (or load it from ``cache_dir`` if made before).

    Returns ``x`` (float32, (N, L)), ``y`` (int64), ``x_test``, ``y_test``. The generator seeds
    NumPy's and Python's global RNGs; their states are restored afterwards.
    """
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "mnist1d" / f"mnist1d_{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}

    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    data = {
        "x": raw["x"].astype(np.float32),
        "y": raw["y"].astype(np.int64),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int64),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so parallel jobs never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(fd)
        np.savez(tmp, **data)
        os.replace(tmp, path)
    return data


class MNIST1DDataModule(TensorSplitsDataModule):
    """MNIST-1D signals ``x`` of shape ``(seq_len,)`` (float32) with labels in ``0..9``.

    Args:
        data_dir: where the generated arrays are cached (``data_dir/mnist1d/*.npz``).
        batch_size: training batch size per device.
        eval_batch_size: validation/test batch size (default: ``batch_size``).
        num_samples: signals generated in total (train + test), as in ``mnist1d``; default 5000.
        train_split: fraction of them in the package's train part (default 0.8 -> 4000 train,
            1000 test).
        n_val: train signals held out for validation (default 1000 -> 3000 train).
        seq_len: signal length (``final_seq_length`` of ``mnist1d``; default 40).
        data_seed: seed of the generator (``mnist1d``'s ``seed``; default 42, the package's).
        split_seed: seed of the train/validation split.
        kind, num_classes, input_shape: declared for the model configs; checked against the data.
        num_workers, pin_memory: ``DataLoader`` options (0 workers suits 2-core machines).
    """

    kind = "signal"
    task = "classification"

    def __init__(
        self,
        data_dir: str = "data/",
        batch_size: int = 64,
        eval_batch_size: int | None = 500,
        num_samples: int = 5000,
        train_split: float = 0.8,
        n_val: int = 1000,
        seq_len: int = 40,
        data_seed: int = 42,
        split_seed: int = 0,
        num_classes: int | None = 10,
        input_shape: list[int] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        kind: str | None = "signal",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, split_seed)
        check_int("data.num_samples", num_samples, 10)
        check_int("data.seq_len", seq_len, 1)
        check_int("data.n_val", n_val, 0)
        if not 0 < train_split < 1:
            raise ValueError(f"Invalid data.train_split: {train_split!r} (expected a number in (0, 1))")
        n_train_total = int((num_samples // 10) * 10 * train_split)
        if n_val >= n_train_total:
            raise ValueError(
                f"Invalid data.n_val: {n_val!r}; the train part has only {n_train_total} signals "
                f"(num_samples={num_samples}, train_split={train_split})"
            )
        self.data_dir = data_dir
        self.n_val = n_val
        self.num_classes = 10
        self.input_shape = (seq_len,)
        check_declared("kind", kind, self.kind)
        check_declared("num_classes", num_classes, self.num_classes)
        check_declared("input_shape", input_shape, self.input_shape)
        self.args = _generation_args(num_samples, train_split, seq_len, data_seed)

    def prepare_data(self) -> None:
        make_mnist1d(self.args, self.data_dir)  # generate and cache once (rank 0)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        data = make_mnist1d(self.args, self.data_dir)
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
        val_idx, train_idx = split_indices(len(y), [self.n_val, len(y) - self.n_val], self.split_seed)
        self.data_train = TensorDataset(x[train_idx], y[train_idx])
        self.data_val = TensorDataset(x[val_idx], y[val_idx])
        self.data_test = TensorDataset(torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]))
