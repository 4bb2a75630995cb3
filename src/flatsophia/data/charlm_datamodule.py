"""Character-level language modelling on an embedded corpus: Python's own standard library.

The corpus is the source of the standard library's top-level ``*.py`` files, read as bytes in
sorted file-name order and joined with newlines until ``max_chars`` bytes. It needs no download
and is the same on every machine with the same Python version (``corpus_sha256`` fingerprints it;
another Python version gives slightly different text).

Vocabulary: the 256 byte values (``vocab_size = 256``), whatever bytes the corpus holds, so the
model's size does not depend on the corpus and any UTF-8 text can be encoded; ``decode`` turns ids
back into text.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from flatsophia.checks import check_int

from ._base import TensorSplitsDataModule, check_declared, split_indices

__all__ = ["CharLMDataModule", "stdlib_corpus", "encode", "decode", "VOCAB_SIZE"]

VOCAB_SIZE = 256


def stdlib_corpus(max_chars: int) -> bytes:
    """The first ``max_chars`` bytes of the standard library's top-level modules, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        parts.append(text)
        total += len(text) + 1
        if total >= max_chars:
            break
    return b"\n".join(parts)[:max_chars]


def encode(text: str | bytes) -> torch.Tensor:
    """Byte ids (int64) of ``text`` (UTF-8 encoded when a ``str``)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(ids) -> str:
    """Text of byte ids (invalid UTF-8 sequences become U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharLMDataModule(TensorSplitsDataModule):
    """Next-byte prediction: ``x`` and ``y`` are int64 ``(block_size,)`` windows, ``y`` = ``x`` shifted by one.

    The corpus is cut into contiguous, non-overlapping windows of ``block_size + 1`` bytes; a
    permutation seeded by ``split_seed`` assigns ``val_fraction`` and ``test_fraction`` of the
    windows to validation and test, the rest to training.

    Args:
        max_chars: corpus length in bytes (default 1,000,000).
        block_size: context length (tokens per example).
        val_fraction, test_fraction: shares of the windows held out.
        batch_size, eval_batch_size, num_workers, pin_memory: ``DataLoader`` options.
        split_seed: seed of the window assignment.
        kind, input_shape, num_classes: declared for the model configs (``tokens``,
            ``[block_size]``, 256); checked (``vocab_size`` too).
        data_dir: unused by the embedded corpus (kept for a uniform config).
    """

    kind = "tokens"
    task = "lm"
    corpus_name = "stdlib"

    def __init__(
        self,
        max_chars: int = 1_000_000,
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
        data_dir: str | None = None,
        kind: str | None = "tokens",
        input_shape: list[int] | None = None,
    ):
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, split_seed)
        self.max_chars = check_int("data.max_chars", max_chars, 2)
        self.block_size = check_int("data.block_size", block_size, 1)
        for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= frac < 1:
                raise ValueError(f"Invalid data.{name}: {frac!r} (expected a number in [0, 1))")
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"Invalid data.val_fraction + data.test_fraction: {val_fraction + test_fraction} (< 1)")
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.data_dir = data_dir
        self.num_classes = self.vocab_size = VOCAB_SIZE
        self.input_shape = (block_size,)
        check_declared("kind", kind, self.kind)
        check_declared("input_shape", input_shape, self.input_shape)
        check_declared("vocab_size", vocab_size, VOCAB_SIZE)
        check_declared("num_classes", num_classes, VOCAB_SIZE)
        self.corpus_sha256: str | None = None

    def load_corpus(self) -> bytes:
        return stdlib_corpus(self.max_chars)

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        corpus = self.load_corpus()[: self.max_chars]
        self.corpus_sha256 = hashlib.sha256(corpus).hexdigest()
        ids = encode(corpus)
        width = self.block_size + 1
        n_windows = len(ids) // width
        n_val = int(round(self.val_fraction * n_windows))
        n_test = int(round(self.test_fraction * n_windows))
        if (
            n_windows - n_val - n_test < 1
            or (self.val_fraction > 0 and n_val < 1)
            or (self.test_fraction > 0 and n_test < 1)
        ):
            raise ValueError(
                f"The {self.corpus_name} corpus ({len(ids)} bytes) gives only {n_windows} windows of "
                f"block_size+1={width}; raise data.max_chars or lower data.block_size"
            )
        windows = ids[: n_windows * width].view(n_windows, width)
        val_idx, test_idx, train_idx = split_indices(
            n_windows, [n_val, n_test, n_windows - n_val - n_test], self.split_seed
        )

        def pairs(idx: torch.Tensor) -> TensorDataset:
            w = windows[idx]
            return TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous())

        self.data_train, self.data_val, self.data_test = pairs(train_idx), pairs(val_idx), pairs(test_idx)
