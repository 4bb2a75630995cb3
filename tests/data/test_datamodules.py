"""Datamodules: shapes, dtypes, determinism, disjoint splits, and clear errors for missing files."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flatsophia.data import (
    CharLMDataModule,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    MNIST1DDataModule,
    TinyShakespeareDataModule,
)
from flatsophia.data._base import split_indices
from flatsophia.data.charlm_datamodule import decode, encode


def rows(dataset) -> set[bytes]:
    x, _ = dataset.tensors
    return {r.numpy().tobytes() for r in x}


def ready(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_mnist1d_defaults(data_dir):
    dm = ready(MNIST1DDataModule(data_dir=str(data_dir)))
    assert (dm.task, dm.num_classes, dm.input_shape) == ("classification", 10, (40,))
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (3000, 1000, 1000)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 40) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    train, val, test = rows(dm.data_train), rows(dm.data_val), rows(dm.data_test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert list((data_dir / "mnist1d").glob("*.npz")), "the generated data are cached"


def test_mnist1d_deterministic_and_split_seed(data_dir):
    a = ready(MNIST1DDataModule(data_dir=str(data_dir), num_samples=1000, n_val=200))
    b = ready(MNIST1DDataModule(data_dir=str(data_dir), num_samples=1000, n_val=200))
    c = ready(MNIST1DDataModule(data_dir=str(data_dir), num_samples=1000, n_val=200, split_seed=1))
    assert torch.equal(a.data_train.tensors[0], b.data_train.tensors[0])
    assert not torch.equal(a.data_val.tensors[0], c.data_val.tensors[0])
    assert torch.equal(a.data_test.tensors[0], c.data_test.tensors[0])  # the package's test split
    assert (len(a.data_train), len(a.data_val), len(a.data_test)) == (600, 200, 200)


def test_mnist1d_generation_keeps_global_rng(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    ready(MNIST1DDataModule(data_dir=str(tmp_path), num_samples=200, n_val=20))
    assert (np.random.rand(), random.random()) == expected


def test_mnist1d_validates_arguments(data_dir):
    with pytest.raises(ValueError, match="num_classes"):
        MNIST1DDataModule(data_dir=str(data_dir), num_classes=5)
    with pytest.raises(ValueError, match="n_val"):
        MNIST1DDataModule(data_dir=str(data_dir), num_samples=1000, n_val=900)
    with pytest.raises(ValueError, match="input_shape"):
        MNIST1DDataModule(data_dir=str(data_dir), input_shape=[41])
    with pytest.raises(ValueError, match="batch_size"):
        MNIST1DDataModule(data_dir=str(data_dir), batch_size=0)


def test_digits():
    dm = ready(DigitsDataModule())
    assert (dm.num_classes, dm.input_shape) == (10, (1, 8, 8))
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (1257, 180, 360)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    again = ready(DigitsDataModule())
    assert torch.equal(dm.data_test.tensors[0], again.data_test.tensors[0])


def test_split_indices_disjoint_and_seeded():
    a = split_indices(100, [10, 20, 70], seed=3)
    assert sorted(torch.cat(a).tolist()) == list(range(100))
    assert all(torch.equal(u, v) for u, v in zip(a, split_indices(100, [10, 20, 70], seed=3)))
    assert not torch.equal(a[0], split_indices(100, [10, 20, 70], seed=4)[0])
    with pytest.raises(ValueError):
        split_indices(10, [6, 6], seed=0)


def test_charlm_windows_and_determinism():
    dm = ready(CharLMDataModule(max_chars=50_000, block_size=64, batch_size=8))
    assert (dm.task, dm.num_classes, dm.input_shape) == ("lm", 256, (64,))
    n = 50_000 // 65
    assert len(dm.data_train) + len(dm.data_val) + len(dm.data_test) == n
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    again = ready(CharLMDataModule(max_chars=50_000, block_size=64))
    assert again.corpus_sha256 == dm.corpus_sha256
    assert torch.equal(again.data_val.tensors[0], dm.data_val.tensors[0])
    assert not (rows(dm.data_train) & rows(dm.data_val))
    assert "def " in decode(torch.cat([w for w in dm.data_train.tensors[0][:50]]))


def test_byte_codec_roundtrip():
    text = "Sophia — clip(m / max(γh, ε), 1)"
    ids = encode(text)
    assert ids.max() < 256 and decode(ids) == text


def test_charlm_too_small_corpus():
    with pytest.raises(ValueError, match="max_chars"):
        ready(CharLMDataModule(max_chars=100, block_size=64))


def test_tinyshakespeare_missing_file_is_a_clear_error(tmp_path):
    dm = TinyShakespeareDataModule(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data\.download=true") as err:
        dm.prepare_data()
    assert str(tmp_path / "tinyshakespeare" / "input.txt") in str(err.value)
    with pytest.raises(FileNotFoundError):
        dm.setup()


def test_tinyshakespeare_reads_a_local_file(tmp_path):
    path = tmp_path / "tinyshakespeare" / "input.txt"
    path.parent.mkdir()
    path.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    dm = ready(TinyShakespeareDataModule(data_dir=str(tmp_path), block_size=32))
    x, y = dm.data_train[0]
    assert x.shape == (32,) and torch.equal(x[1:], y[:-1])


@pytest.mark.parametrize(
    ("cls", "folder"), [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")]
)
def test_cifar_missing_files_is_a_clear_error(tmp_path, cls, folder):
    dm = cls(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data\.download=true") as err:
        dm.prepare_data()
    message = str(err.value)
    assert folder in message and "cs.toronto.edu" in message
    with pytest.raises(FileNotFoundError):
        dm.setup()
    (tmp_path / folder).mkdir()  # an empty folder is not enough
    with pytest.raises(FileNotFoundError):
        dm.setup()


def test_cifar_declared_shape():
    dm = CIFAR100DataModule(image_size=64)
    assert (dm.kind, dm.num_classes, dm.input_shape) == ("image", 100, (3, 64, 64))
    with pytest.raises(ValueError, match="num_classes"):
        CIFAR10DataModule(num_classes=100)


@pytest.mark.parametrize(
    ("cls", "kind", "task"),
    [
        (MNIST1DDataModule, "signal", "classification"),
        (DigitsDataModule, "image", "classification"),
        (CIFAR10DataModule, "image", "classification"),
        (CIFAR100DataModule, "image", "classification"),
        (CharLMDataModule, "tokens", "lm"),
        (TinyShakespeareDataModule, "tokens", "lm"),
    ],
)
def test_declared_kind_is_checked(cls, kind, task):
    assert (cls.kind, cls.task) == (kind, task)
    wrong = "image" if kind != "image" else "signal"
    with pytest.raises(ValueError, match=rf"Invalid data\.kind: '{wrong}'; this dataset has kind='{kind}'"):
        cls(kind=wrong)


@pytest.mark.parametrize("cls", [CIFAR10DataModule, TinyShakespeareDataModule])
def test_missing_files_are_found_before_anything_else(tmp_path, cls):
    with pytest.raises(FileNotFoundError, match=r"data\.download=true"):
        cls(data_dir=str(tmp_path)).check_available()
    cls(data_dir=str(tmp_path), download=True).check_available()  # prepare_data will fetch them
    MNIST1DDataModule(data_dir=str(tmp_path)).check_available()  # generated data: nothing to check
