"""Token files (scripts/prepare_tokens.py) and the data=tokens windows: contiguous, per-rank, resumable."""

from __future__ import annotations

import pickle
import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _spawn import spawn
from conftest import token_documents
from flatsophia.data.prepare_tokens import Tokenizer, get_tokenizer, main, prepare
from flatsophia.data.token_files import TokenFile, read_meta
from flatsophia.data.tokens_datamodule import TokensDataModule, TrainWindows


def tokens_of(folder, split="train", dtype=np.uint16) -> np.ndarray:
    return np.fromfile(folder / f"{split}.bin", dtype=dtype)


def datamodule(folder, **kw) -> TokensDataModule:
    args = dict(data_dir=str(folder.parent), dataset=folder.name, block_size=16, batch_size=3, eval_iters=2,
                num_classes=256)
    dm = TokensDataModule(**{**args, **kw})
    dm.setup()
    return dm


def test_prepare_writes_each_document_to_one_split_in_order(tmp_path):
    docs = token_documents(12, 500)
    meta = main(["--tokenizer", "bytes", "--text", *map(str, _write(tmp_path, docs)), "--out", str(tmp_path / "out"),
                 "--val-fraction", "0.3", "--split-seed", "1"])
    assert (meta["vocab_size"], meta["dtype"], meta["tokenizer"]) == (256, "uint16", "bytes")
    to_val = np.random.default_rng(1).random(len(docs)) < 0.3  # the documented assignment
    assert 0 < to_val.sum() < len(docs)
    for split, docs_in in (("train", [d for d, v in zip(docs, to_val) if not v]),
                           ("val", [d for d, v in zip(docs, to_val) if v])):
        expected = b"".join(d.encode("utf-8") for d in docs_in)
        assert tokens_of(tmp_path / "out", split).astype(np.uint8).tobytes() == expected
        assert meta[f"{split}_tokens"] == len(expected) and meta[f"{split}_documents"] == len(docs_in)
    assert read_meta(tmp_path / "out") == meta


def _write(tmp_path, docs):
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"doc{i:02d}.txt"
        path.write_text(doc, encoding="utf-8")
        paths.append(path)
    return paths


def test_large_vocabularies_use_uint32(tmp_path):
    big = Tokenizer("big", 70_000, lambda texts: [[69_999, len(t), 65_536 + len(t)] for t in texts], eot=0)
    meta = prepare(["ab", "abc", "abcd"] * 4, tmp_path, big, val_fraction=0.5, split_seed=0, log=lambda _: None)
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([tokens_of(tmp_path, s, np.uint32) for s in ("train", "val")])
    assert sorted(ids.reshape(-1, 4).tolist()) == sorted([[69_999, n, 65_536 + n, 0] for n in (2, 3, 4)] * 4)


def test_gpt2_tokenizer_without_tiktoken_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken -> ImportError
    with pytest.raises(ImportError, match="pip install tiktoken.*--tokenizer bytes works offline"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="Invalid tokenizer: 'bpe'"):
        get_tokenizer("bpe")


def test_training_windows_are_contiguous_next_token_pairs(token_files):
    data = tokens_of(token_files).astype(np.int64)
    stream = TrainWindows(TokenFile(token_files / "train.bin", "uint16"), block_size=16, batch_size=4, seed=3)
    for index in range(5):
        x, y = stream.batch(index)
        assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
        for row_x, row_y, i in zip(x, y, stream.offsets(index)):
            assert 0 <= i <= len(data) - 17
            assert row_x.tolist() == data[i : i + 16].tolist()
            assert row_y.tolist() == data[i + 1 : i + 17].tolist()


def test_ranks_read_different_shares_of_one_global_batch(token_files):
    file = TokenFile(token_files / "train.bin", "uint16")
    one = TrainWindows(file, 16, batch_size=6, seed=5)
    ranks = [TrainWindows(file, 16, batch_size=3, seed=5, rank=r, world_size=2) for r in range(2)]
    for index in (0, 7):
        x0, x1 = (r.batch(index)[0] for r in ranks)
        assert not torch.equal(x0, x1)
        assert torch.equal(torch.cat([x0, x1]), one.batch(index)[0])  # 2 ranks x 3 = 1 rank x 6
    other_seed = TrainWindows(file, 16, batch_size=6, seed=6)
    assert not np.array_equal(other_seed.offsets(0), one.offsets(0))
    with pytest.raises(ValueError, match=r"Invalid rank: 2 \(expected an integer in \[0, 2\)\)"):
        TrainWindows(file, 16, 3, rank=2, world_size=2)


def test_workers_give_the_stream_of_one_process(token_files):
    stream = TrainWindows(TokenFile(token_files / "train.bin", "uint16"), 16, batch_size=2, seed=0, start=4)
    assert len(pickle.dumps(stream)) < 2000  # workers get a path, not the tokens (the file is ~90 kB)
    expected = [stream.batch(4 + i)[0] for i in range(6)]
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    got = [x for (x, _), _ in zip(loader, range(6))]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_validation_windows_are_fixed_across_runs(token_files):
    a, b = datamodule(token_files, seed=1), datamodule(token_files, seed=2)
    assert len(a.data_val) == 2 * 3
    assert all(torch.equal(a.data_val[k][0], b.data_val[k][0]) for k in range(len(a.data_val)))
    assert not torch.equal(a.train_windows().batch(0)[0], b.train_windows().batch(0)[0])
    val = tokens_of(token_files, "val").astype(np.int64)
    x, y = a.data_val[1]
    i = int(a.data_val.offsets[1])
    assert x.tolist() == val[i : i + 16].tolist() and y.tolist() == val[i + 1 : i + 17].tolist()
    assert not np.array_equal(a.data_test.offsets, a.data_val.offsets)  # no test.bin: other val windows


class Recorder(L.LightningModule):
    """A tiny model that keeps the training batches it sees."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(256, 4)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        logits = self.emb(x) @ self.emb.weight.T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(folder, tmp_path, max_steps, ckpt_path=None, every=None, num_workers=1, **trainer_kw):
    dm = TokensDataModule(data_dir=str(folder.parent), dataset=folder.name, block_size=8, batch_size=2, num_classes=256,
                          seed=7, num_workers=num_workers)
    model = Recorder()
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                                     filename="{step}")] if every else []
    trainer = L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(every), callbacks=callbacks,
                        default_root_dir=tmp_path, **trainer_kw)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen


def _fit_rank(rank, world, folder, tmp_path):
    return fit(folder, tmp_path / f"rank{rank}", max_steps=2, num_workers=0, accelerator="cpu", devices=world,
               strategy="ddp")


def test_ddp_ranks_read_their_shares_of_the_global_batch(token_files, tmp_path):
    """Two DDP ranks (gloo): the datamodule takes each rank's share from the trainer."""
    rank0, rank1 = spawn(_fit_rank, token_files, tmp_path, world=2, lightning=True)
    one = TrainWindows(TokenFile(token_files / "train.bin", "uint16"), 8, batch_size=4, seed=7)
    for index in range(2):
        assert not torch.equal(rank0[index], rank1[index])
        assert torch.equal(torch.cat([rank0[index], rank1[index]]), one.batch(index)[0])


def test_resumed_run_reads_the_windows_of_the_uninterrupted_one(token_files, tmp_path):
    full = fit(token_files, tmp_path / "a", max_steps=6, every=3)
    assert len(full) == 6 and len({tuple(x.flatten().tolist()) for x in full}) == 6
    resumed = fit(token_files, tmp_path / "b", max_steps=6, ckpt_path=str(tmp_path / "a" / "step=3.ckpt"))
    assert len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))
    state = torch.load(tmp_path / "a" / "step=3.ckpt", weights_only=True)["TokensDataModule"]
    assert state == {"train_batches": 3, "seed": 7, "batch_size": 2, "world_size": 1}


def test_bad_inputs_are_named(token_files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train.bin, val.bin not found in .*prepare_tokens.py"):
        TokensDataModule(data_dir=str(tmp_path), dataset="nothing").check_available()
    with pytest.raises(ValueError, match=r"data.num_classes: 100 .* smaller than the token files' vocab_size 256"):
        datamodule(token_files, num_classes=100)
    with pytest.raises(ValueError, match=r"Invalid data.dtype: 'uint32'; .*meta.json says dtype='uint16'"):
        datamodule(token_files, dtype="uint32")
    bare = tmp_path / "bare"
    bare.mkdir()
    for split in ("train", "val"):
        (bare / f"{split}.bin").write_bytes((token_files / f"{split}.bin").read_bytes())
    with pytest.raises(FileNotFoundError, match="data.vocab_size and data.dtype not set.*50257 data.dtype=uint16"):
        datamodule(bare)
    dm = datamodule(bare, vocab_size=256, dtype="uint16")  # nanoGPT's files: no meta.json, values given
    assert torch.equal(dm.train_windows().batch(0)[0], datamodule(token_files).train_windows().batch(0)[0])
    with pytest.raises(ValueError, match=r"holds \d+ tokens: fewer than block_size \+ 1"):
        datamodule(token_files, block_size=10**7)


def test_each_epoch_continues_the_stream(token_files, tmp_path):
    """Epochs bounded by limit_train_batches: the second epoch reads batches 3-5, not 0-2 again."""
    seen = fit(token_files, tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=3)
    one = TrainWindows(TokenFile(token_files / "train.bin", "uint16"), 8, batch_size=2, seed=7)
    assert len(seen) == 6
    assert all(torch.equal(x, one.batch(i)[0]) for i, x in enumerate(seen))
