"""Token files in nanoGPT's format, and the random windows the language-model runs read from them.

A token folder holds ``train.bin`` and ``val.bin`` (optionally ``test.bin``): the token ids of a
corpus, concatenated, as raw little-endian ``uint16`` (vocabularies up to 65,536 ids, e.g. GPT-2's
50,257) or ``uint32`` (larger ones), and ``meta.json``::

    {"vocab_size": 50257, "dtype": "uint16", "tokenizer": "gpt2", "eot_token": 50256, ...}

These are the files of nanoGPT's and Sophia's ``data/openwebtext/prepare.py`` plus the metadata
file (theirs write none and assume ``uint16``); ``scripts/prepare_tokens.py`` writes all of them.
Files are read through ``np.memmap``, never loaded whole.

Windows are contiguous: a window starting at offset ``i`` gives ``x = data[i : i + T]`` and
``y = data[i + 1 : i + 1 + T]`` (``T`` = block size), as the authors' ``get_batch``. Offsets are a
pure function of ``(seed, batch index)`` (:func:`batch_offsets`), so a run can be resumed at any
batch and ranks can read their share of each batch without talking to each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "META_FILE",
    "SPLITS",
    "DTYPES",
    "dtype_for_vocab",
    "write_meta",
    "read_meta",
    "TokenFile",
    "batch_offsets",
    "read_windows",
]

META_FILE = "meta.json"
SPLITS = ("train", "val", "test")
#: Token dtypes by name: the smallest unsigned integer that holds every id.
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int) -> str:
    """``"uint16"`` for vocabularies of at most 65,536 ids, else ``"uint32"``."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"Invalid vocab_size: {vocab_size!r} (expected an integer >= 1)")
    if vocab_size > 2**32:
        raise ValueError(f"Invalid vocab_size: {vocab_size} (at most 2**32 ids fit the uint32 token files)")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_meta(folder: str | Path, vocab_size: int, **extra) -> dict:
    """Write ``folder/meta.json`` with the vocabulary size, its dtype and ``extra`` keys; return it."""
    meta = {"vocab_size": int(vocab_size), "dtype": dtype_for_vocab(int(vocab_size)), **extra}
    path = Path(folder) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(folder: str | Path, vocab_size: int | None = None, dtype: str | None = None) -> dict:
    """The metadata of a token folder: ``meta.json``, or ``vocab_size``/``dtype`` given for files without one.

    Values given here must agree with ``meta.json`` when both exist. Raises ``FileNotFoundError``
    when neither says what the files hold.
    """
    path = Path(folder) / META_FILE
    meta = json.loads(path.read_text()) if path.exists() else {}
    for key, given in (("vocab_size", vocab_size), ("dtype", dtype)):
        if given is None:
            continue
        if key in meta and meta[key] != given:
            raise ValueError(f"Invalid data.{key}: {given!r}; {path} says {key}={meta[key]!r} (set data.{key}=null)")
        meta[key] = given
    missing = [k for k in ("vocab_size", "dtype") if meta.get(k) is None]
    if missing:
        raise FileNotFoundError(
            f"{path} not found, and data.{' and data.'.join(missing)} not set: say what the token files hold, "
            "e.g. data.vocab_size=50257 data.dtype=uint16 for the files of nanoGPT's openwebtext/prepare.py, "
            "or write them with scripts/prepare_tokens.py (which writes meta.json)"
        )
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"Invalid dtype {meta['dtype']!r} of {folder}; choose one of {', '.join(DTYPES)}")
    if dtype_for_vocab(int(meta["vocab_size"])) == "uint32" and meta["dtype"] == "uint16":
        raise ValueError(f"vocab_size {meta['vocab_size']} does not fit dtype uint16 (ids up to 65,535); use uint32")
    return meta


@dataclass(frozen=True)
class TokenFile:
    """One split's file: its path, dtype and length in tokens (read once, from the file size)."""

    path: Path
    dtype: str

    @property
    def n_tokens(self) -> int:
        return self.path.stat().st_size // np.dtype(DTYPES[self.dtype]).itemsize

    def open(self) -> np.memmap:
        """A read-only memory map of the file (cheap: open one per batch; nothing is loaded)."""
        return np.memmap(self.path, dtype=DTYPES[self.dtype], mode="r")

    def check_fits(self, block_size: int) -> None:
        n = self.n_tokens
        if n < block_size + 1:
            raise ValueError(
                f"{self.path} holds {n} tokens: fewer than block_size + 1 = {block_size + 1}; "
                "lower data.block_size or prepare more text"
            )


def batch_offsets(seed: int, index: int, count: int, n_tokens: int, block_size: int) -> np.ndarray:
    """Start offsets of the ``count`` windows of batch ``index`` of the stream seeded by ``seed``.

    Uniform over ``[0, n_tokens - block_size - 1]`` (every window and its shifted target fit), drawn
    from a generator keyed by ``(seed, index)`` alone: the same batch index gives the same windows in
    any process, before or after a resume.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"Invalid seed/index: {seed}, {index} (expected integers >= 0)")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return rng.integers(0, n_tokens - block_size, size=count, dtype=np.int64)


def read_windows(data: np.ndarray, offsets, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` int64 tensors ``(len(offsets), block_size)``: ``x = data[i:i+T]``, ``y = data[i+1:i+1+T]``."""
    rows = np.stack([np.asarray(data[i : i + block_size + 1], dtype=np.int64) for i in offsets])
    rows = torch.from_numpy(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
