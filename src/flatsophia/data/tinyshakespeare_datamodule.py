"""Tiny Shakespeare (Karpathy's char-rnn corpus, ~1.1 MB) for character-level language modelling.

With ``download: false`` (the default) the file must already be at
``data_dir/tinyshakespeare/input.txt``; otherwise setup stops with a message saying what to fetch
and where, or to set ``data.download=true``. A download is checked against a pinned SHA-256 (as
torchvision checks CIFAR's archives with MD5) before it is moved into place; a mismatch is refused.
Windows, splits and the byte vocabulary are those of
:class:`~flatsophia.data.charlm_datamodule.CharLMDataModule`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import urllib.request
from pathlib import Path

from .charlm_datamodule import VOCAB_SIZE, CharLMDataModule

log = logging.getLogger(__name__)

__all__ = ["TinyShakespeareDataModule", "TINYSHAKESPEARE_URL", "TINYSHAKESPEARE_SHA256", "download_verified"]

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
#: SHA-256 of that file (1,115,394 bytes), as pinned by many independent projects that verify it.
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def download_verified(url: str, path: Path, sha256: str | None, timeout: float = 60.0) -> None:
    """Fetch ``url`` to ``path`` through a temporary file in its folder, checking its SHA-256 first.

    On a mismatch (or any failure) the partial file is removed, ``path`` is left as it was, and
    ``ValueError`` names the URL, the file and both digests. ``sha256=None`` skips the check (warned).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if sha256 is None:
            log.warning("Not verifying %s (sha256 is null); its SHA-256 is %s", url, got)
        elif got != sha256.lower():
            raise ValueError(
                f"Download of {url} to {path} failed verification: expected SHA-256 {sha256}, got {got} "
                f"({size} bytes). The partial file was removed. Retry later, or if the file at that URL is "
                f"meant to be different, set data.sha256 to its SHA-256."
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TinyShakespeareDataModule(CharLMDataModule):
    """Byte-level LM windows of Tiny Shakespeare; see :class:`CharLMDataModule` for the arguments.

    Args:
        data_dir: the file lives at ``data_dir/tinyshakespeare/input.txt``.
        download: fetch it from ``url`` when missing (default ``false``: missing file raises).
        url: where to download from.
        sha256: SHA-256 the download must have (default: that of Karpathy's file); ``None`` skips the check.
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
        sha256: str | None = TINYSHAKESPEARE_SHA256,
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
        if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256)):
            raise ValueError(f"Invalid data.sha256: {sha256!r} (expected 64 hex digits, or null to skip the check)")
        self.download = bool(download)
        self.url = url
        self.sha256 = sha256

    @property
    def path(self) -> Path:
        return Path(self.data_dir) / "tinyshakespeare" / "input.txt"

    def prepare_data(self) -> None:
        if self.download and not self.path.exists():
            download_verified(self.url, self.path, self.sha256)
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
