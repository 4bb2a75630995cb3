"""CIFAR-10 through torchvision (download on request only).

With ``download: false`` (the default) the files must already be under ``data_dir``; otherwise
setup stops with a message saying what to fetch and where, or to set ``data.download=true``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Subset

from flatsophia.checks import check_int

from ._base import TensorSplitsDataModule, check_declared, split_indices

__all__ = ["CIFAR10DataModule", "CIFARDataModuleBase"]

log = logging.getLogger(__name__)


class CIFARDataModuleBase(TensorSplitsDataModule):
    """Shared code of the CIFAR datamodules; subclasses set the class attributes below.

    Images ``x`` are float tensors ``(3, image_size, image_size)`` normalised by the training-set
    channel mean/std. ``n_val`` images of the 50,000 training images are held out for validation
    (chosen by ``split_seed``); the 10,000 test images are the test set. With ``n_val: 0`` the
    model trains on all 50,000 images and validates on the test set (as the FlatSophia reference
    experiment, which tracks test loss during training).

    Args:
        data_dir: root folder handed to torchvision (the archive is extracted into
            ``data_dir/<folder>``).
        download: fetch the archive (~170 MB) when missing. Default ``false``: missing files raise.
        batch_size, eval_batch_size, num_workers, pin_memory: ``DataLoader`` options.
        n_val: validation images taken from the training set (default 5000; 0: validate on test).
        augment: random crop (padding 4) and horizontal flip on training images.
        image_size: side length fed to the model; images are resized when it is not 32.
        split_seed: seed of the train/validation split.
        kind, num_classes, input_shape: declared for the model configs; checked (``in_chans`` too).
    """

    kind = "image"
    task = "classification"
    dataset_name: str = ""
    torchvision_class: str = ""
    folder: str = ""
    classes: int = 0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = 512,
        n_val: int = 5000,
        augment: bool = True,
        image_size: int = 32,
        split_seed: int = 0,
        num_classes: int | None = None,
        in_chans: int | None = 3,
        input_shape: list[int] | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        kind: str | None = "image",
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, split_seed)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.n_val = check_int("data.n_val", n_val, 0)
        if n_val >= 50000:
            raise ValueError(f"Invalid data.n_val: {n_val!r} (the training set has 50000 images)")
        self.augment = bool(augment)
        self.image_size = check_int("data.image_size", image_size, 1)
        self.num_classes = self.classes
        self.input_shape = (3, image_size, image_size)
        check_declared("kind", kind, self.kind)
        check_declared("num_classes", num_classes, self.classes)
        check_declared("in_chans", in_chans, 3)
        check_declared("input_shape", input_shape, self.input_shape)

    def _dataset_class(self):
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    def _check_present(self) -> None:
        cls = self._dataset_class()
        folder = Path(self.data_dir) / self.folder
        ok = folder.is_dir()
        if ok:
            try:
                cls(self.data_dir, train=True, download=False)
            except RuntimeError:
                ok = False
        if not ok:
            raise FileNotFoundError(
                f"{self.dataset_name} not found (or incomplete) under {folder}. Either run with "
                f"data.download=true to fetch it from {cls.url} (~170 MB), or download and extract that "
                f"archive yourself so that {folder} holds its files; data.data_dir is {self.data_dir!r}."
            )

    def prepare_data(self) -> None:
        if self.download:
            cls = self._dataset_class()
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)
        self._check_present()

    def _transform(self, train: bool):
        from torchvision import transforms as T

        steps = []
        if train and self.augment:
            steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        if self.image_size != 32:
            steps.append(T.Resize(self.image_size, antialias=True))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        self._check_present()
        cls = self._dataset_class()
        train_aug = cls(self.data_dir, train=True, transform=self._transform(train=True))
        train_plain = cls(self.data_dir, train=True, transform=self._transform(train=False))
        n = len(train_plain)
        val_idx, train_idx = split_indices(n, [self.n_val, n - self.n_val], self.split_seed)
        self.data_train = Subset(train_aug, train_idx.tolist())
        self.data_test = cls(self.data_dir, train=False, transform=self._transform(train=False))
        if self.n_val:
            self.data_val = Subset(train_plain, val_idx.tolist())
        else:
            log.warning("data.n_val=0: validating on the %s test set", self.dataset_name)
            self.data_val = self.data_test


class CIFAR10DataModule(CIFARDataModuleBase):
    """CIFAR-10: 32x32 colour images in 10 classes (50,000 train, 10,000 test)."""

    dataset_name = "CIFAR-10"
    torchvision_class = "CIFAR10"
    folder = "cifar-10-batches-py"
    classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
