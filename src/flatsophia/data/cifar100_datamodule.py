"""CIFAR-100 through torchvision (download on request only); see :mod:`.cifar10_datamodule`."""

from __future__ import annotations

from .cifar10_datamodule import CIFARDataModuleBase

__all__ = ["CIFAR100DataModule"]


class CIFAR100DataModule(CIFARDataModuleBase):
    """CIFAR-100: 32x32 colour images in 100 fine classes (50,000 train, 10,000 test)."""

    dataset_name = "CIFAR-100"
    torchvision_class = "CIFAR100"
    folder = "cifar-100-python"
    classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
