"""Turn text into token files (``train.bin``, ``val.bin``, ``meta.json``; see :mod:`flatsophia.data.token_files`).

Command line (``python scripts/prepare_tokens.py --help``)::

    # OpenWebText with GPT-2's tokenizer, as nanoGPT/Sophia (needs `datasets`, `tiktoken`, internet; ~9B tokens)
    python scripts/prepare_tokens.py --tokenizer gpt2 --hf-dataset openwebtext --out data/openwebtext
    # FineWeb's 10B-token sample, streamed (no full download)
    python scripts/prepare_tokens.py --tokenizer gpt2 --hf-dataset HuggingFaceFW/fineweb \\
        --hf-config sample-10BT --streaming --out data/fineweb10b
    # Local text files, byte-level (offline; one document per file)
    python scripts/prepare_tokens.py --tokenizer bytes --text notes/*.txt --out data/mytext

Documents are split between train and val at random (``--val-fraction``, ``--split-seed``: each
document goes to val with that probability, decided in order by a seeded generator; nanoGPT holds
out 0.05% of OpenWebText's documents). With the ``gpt2`` tokenizer every document is followed by
the end-of-text token (50256), as nanoGPT's prepare script. Tokens are appended to the files in
chunks, so memory stays small whatever the corpus size.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .token_files import DTYPES, dtype_for_vocab, write_meta

__all__ = ["Tokenizer", "get_tokenizer", "TOKENIZERS", "prepare", "text_files", "hf_documents", "main"]

TOKENIZERS = ("bytes", "gpt2")


class Tokenizer:
    """``encode_batch(texts) -> list of id lists`` with ``vocab_size`` and an optional end-of-text id."""

    def __init__(
        self, name: str, vocab_size: int, encode_batch: Callable[[list[str]], list[list[int]]], eot: int | None
    ):
        self.name, self.vocab_size, self.encode_batch, self.eot = name, vocab_size, encode_batch, eot


def _bytes_encode(texts: list[str]) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]


def get_tokenizer(name: str) -> Tokenizer:
    """``bytes``: the 256 byte values of the UTF-8 text (offline, no end-of-text token; the ids of
    ``data=charlm``). ``gpt2``: GPT-2's BPE through ``tiktoken`` (50,257 ids; downloads its
    vocabulary on first use)."""
    if name == "bytes":
        return Tokenizer("bytes", 256, _bytes_encode, None)
    if name == "gpt2":
        try:
            import tiktoken
        except ImportError as err:
            raise ImportError(
                "--tokenizer gpt2 needs the tiktoken package: pip install tiktoken "
                "(it downloads GPT-2's vocabulary on first use); --tokenizer bytes works offline"
            ) from err
        enc = tiktoken.get_encoding("gpt2")
        return Tokenizer("gpt2", enc.n_vocab, enc.encode_ordinary_batch, enc.eot_token)
    raise ValueError(f"Invalid tokenizer: {name!r} (choose one of {', '.join(TOKENIZERS)})")


def text_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """The documents of local text files: one per file (UTF-8; undecodable bytes become U+FFFD)."""
    for path in paths:
        yield Path(path).read_text(encoding="utf-8", errors="replace")


def hf_documents(
    name: str, config: str | None = None, split: str = "train", column: str = "text", streaming: bool = False
) -> Iterator[str]:
    """The ``column`` of a Hugging Face dataset (needs the ``datasets`` package and internet)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("--hf-dataset needs the datasets package: pip install datasets (and internet)") from err
    data = datasets.load_dataset(name, config, split=split, streaming=streaming)
    for row in data:
        yield row[column]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def prepare(
    documents: Iterable[str],
    out: str | Path,
    tokenizer: str | Tokenizer = "bytes",
    val_fraction: float = 0.0005,
    split_seed: int = 2357,
    max_documents: int | None = None,
    chunk: int = 1024,
    source: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize ``documents`` into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``; return the metadata.

    Each document goes to val with probability ``val_fraction`` (a generator seeded by
    ``split_seed`` decides, document by document). Existing files in ``out`` are replaced.
    """
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    if not 0 < val_fraction < 1:
        raise ValueError(f"Invalid val_fraction: {val_fraction!r} (expected a number in (0, 1))")
    if max_documents is not None and max_documents < 2:
        raise ValueError(f"Invalid max_documents: {max_documents!r} (expected an integer >= 2 or None)")
    dtype_name = dtype_for_vocab(tok.vocab_size)
    dtype = DTYPES[dtype_name]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(split_seed)
    counts = {s: {"documents": 0, "tokens": 0} for s in ("train", "val")}
    docs = documents if max_documents is None else itertools.islice(documents, max_documents)
    files = {s: open(folder / f"{s}.bin", "wb") for s in ("train", "val")}  # noqa: SIM115 (closed below)
    try:
        for texts in _chunks(docs, chunk):
            to_val = rng.random(len(texts)) < val_fraction
            for ids, is_val in zip(tok.encode_batch(texts), to_val):
                if tok.eot is not None:
                    ids = [*ids, tok.eot]
                split = "val" if is_val else "train"
                np.asarray(ids, dtype=dtype).tofile(files[split])
                counts[split]["documents"] += 1
                counts[split]["tokens"] += len(ids)
            done = counts["train"]["documents"] + counts["val"]["documents"]
            if done % (chunk * 100) < chunk:
                log(f"{done} documents, {counts['train']['tokens'] + counts['val']['tokens']:,} tokens")
    finally:
        for f in files.values():
            f.close()
    for split, c in counts.items():
        if c["tokens"] == 0:
            raise ValueError(
                f"No document went to {split} ({c['documents']} of "
                f"{counts['train']['documents'] + counts['val']['documents']} documents); "
                "raise --val-fraction or give more documents"
            )
    meta = write_meta(
        folder,
        tok.vocab_size,
        tokenizer=tok.name,
        eot_token=tok.eot,
        split_seed=split_seed,
        val_fraction=val_fraction,
        source=source,
        **{f"{s}_{k}": v for s, c in counts.items() for k, v in c.items()},
    )
    train_n, val_n = counts["train"]["tokens"], counts["val"]["tokens"]
    log(f"wrote {folder}: {train_n:,} train and {val_n:,} val tokens ({dtype_name})")
    return meta


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="prepare_tokens.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="FILE", help="local UTF-8 text files, one document each")
    src.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset (openwebtext, HuggingFaceFW/fineweb)")
    parser.add_argument("--hf-config", default=None, help="the dataset's configuration (e.g. sample-10BT)")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it whole")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2")
    parser.add_argument("--out", required=True, help="output folder (data.data_dir/data.dataset of data=tokens)")
    parser.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents for val.bin")
    parser.add_argument("--split-seed", type=int, default=2357, help="seed of the train/val assignment")
    parser.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    args = parser.parse_args(argv)
    if args.text:
        documents, source = text_files(args.text), f"{len(args.text)} text files"
    else:
        documents = hf_documents(args.hf_dataset, args.hf_config, args.hf_split, args.text_column, args.streaming)
        source = f"hf:{args.hf_dataset}" + (f"/{args.hf_config}" if args.hf_config else "") + f":{args.hf_split}"
    return prepare(
        documents,
        args.out,
        args.tokenizer,
        args.val_fraction,
        args.split_seed,
        args.max_documents,
        source=source,
        log=lambda msg: print(msg, file=sys.stderr),
    )
