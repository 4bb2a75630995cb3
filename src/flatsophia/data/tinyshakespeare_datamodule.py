"""Tiny Shakespeare (Karpathy's char-rnn corpus, ~1.1 MB) for character-level language modelling.

With ``download: false`` (the default) the file must already be at
``data_dir/tinyshakespeare/input.txt``; otherwise setup stops with a message saying what to fetch
and where, or to set ``data.download=true``. Windows, splits and the byte vocabulary are those of
:class:`~flatsophia.data.charlm_datamodule.CharLMDataModule`.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

from .charlm_datamodule import VOCAB_SIZE, CharLMDataModule

__all__ = ["TinyShakespeareDataModule", "TINYSHAKESPEARE_URL"]

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class TinyShakespeareDataModule(CharLMDataModule):
    """Byte-level LM windows of Tiny Shakespeare; see :class:`CharLMDataModule` for the arguments.

    Args:
        data_dir: the file lives at ``data_dir/tinyshakespeare/input.txt``.
        download: fetch it from ``url`` when missing (default ``false``: missing file raises).
        url: where to download from.
        max_chars: bytes of the file used (default: all of it).
    """

    corpus_name = "tinyshakespeare"

    def __init__(
        self,
        data_dir: str = "data/",
        download: bool = False,
        url: str = TINYSHAKESPEARE_URL,
        max_chars: int = 10**9,
        block_size: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        batch_size: int = 32,
        eval_batch_size: int | None = 128,
        split_seed: int = 0,
        vocab_size: int | None = VOCAB_SIZE,
        num_classes: int | None = VOCAB_SIZE,
        num_workers: int = 0,
        pin_memory: bool = False,
        kind: str | None = "tokens",
        input_shape: list[int] | None = None,
    ):
        super().__init__(
            max_chars=max_chars,
            block_size=block_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            split_seed=split_seed,
            vocab_size=vocab_size,
            num_classes=num_classes,
            num_workers=num_workers,
            pin_memory=pin_memory,
            data_dir=data_dir,
            kind=kind,
            input_shape=input_shape,
        )
        self.download = bool(download)
        self.url = url

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "tinyshakespeare" / "input.txt"

    def prepare_data(self) -> None:
        if self.download and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".part")
            os.close(fd)
            try:
                urllib.request.urlretrieve(self.url, tmp)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        self._check_present()

    def _check_present(self) -> None:
        if not self.path.is_file():
            raise FileNotFoundError(
                f"Tiny Shakespeare not found at {self.path}. Either run with data.download=true to fetch it "
                f"from {self.url} (~1.1 MB), or download that file yourself to {self.path}; "
                f"data.data_dir is {self.data_dir!r}."
            )

    def load_corpus(self) -> bytes:
        self._check_present()
        return self.path.read_bytes()
