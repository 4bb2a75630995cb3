"""LightningDataModules: one file per dataset, ``<name>_datamodule.py`` holding ``<Name>DataModule``.

Every datamodule sets ``task`` (``"classification"`` or ``"lm"``), ``num_classes`` (vocabulary size
for ``lm``) and ``input_shape``, and yields ``(x, y)`` batches from separate train/val/test splits
fixed by ``split_seed``.
"""

from .charlm_datamodule import CharLMDataModule
from .cifar10_datamodule import CIFAR10DataModule
from .cifar100_datamodule import CIFAR100DataModule
from .digits_datamodule import DigitsDataModule
from .mnist1d_datamodule import MNIST1DDataModule
from .tinyshakespeare_datamodule import TinyShakespeareDataModule
from .tokens_datamodule import TokensDataModule

__all__ = [
    "MNIST1DDataModule",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CharLMDataModule",
    "TinyShakespeareDataModule",
    "TokensDataModule",
]
