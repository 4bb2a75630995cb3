"""LMThroughput: tokens seen (summed over ranks and micro-batches), rates, MFU, ETA; inert off token data."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from flatsophia.callbacks import LMThroughput, model_flops_per_token
from flatsophia.models.components.gpt import GPT
from flatsophia.training import train

B, T = 4, 16  # sequences per batch per rank, tokens per sequence

GPT_RUN = [
    "logger=csv",
    "data=charlm",
    "data.max_chars=20000",
    f"data.block_size={T}",
    f"data.batch_size={B}",
    "model=gpt",
    "model.n_layer=2",
    "model.n_embd=16",
    "model.n_head=2",
    "optimizer=sophia_g",
    "module.accumulate=2",
    "++trainer.limit_train_batches=6",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "test=false",
    "+callbacks.throughput._target_=flatsophia.callbacks.LMThroughput",
    "+callbacks.throughput.peak_tflops=1e-4",  # a made-up peak, so the CPU run logs an MFU
]


def _gpt_params_without_positions(n_layer: int, d: int, vocab: int) -> int:
    """Per block: 2 LayerNorms (4d), qkv (3d^2 + 3d), attention out (d^2 + d), MLP (8d^2 + 5d); plus the
    token table (shared with the head) and the final LayerNorm."""
    return n_layer * (12 * d * d + 13 * d) + vocab * d + 2 * d


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_flops_per_token(tie):
    net = GPT(vocab_size=50, block_size=32, n_layer=3, n_head=4, n_embd=24, tie_weights=tie)
    flops, formula = model_flops_per_token(net, seq_len=20)
    n = _gpt_params_without_positions(3, 24, 50)  # untied: the head's matrix counts, the lookup table not
    assert formula == "6N+12LdT" and flops == 6 * n + 12 * 3 * 24 * 20


def test_other_networks_count_6n():
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False))
    assert model_flops_per_token(net, seq_len=9) == (6.0 * (5 * 7 + 7 + 7 * 3), "6N")


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="peak_tflops: -1"):
        LMThroughput(peak_tflops=-1)
    with pytest.raises(ValueError, match="window: 0"):
        LMThroughput(window=0)


def _rows(cfg) -> list[dict[str, str]]:
    (table,) = Path(cfg.paths.output_dir).glob("csv/*/metrics.csv")
    return list(csv.DictReader(open(table)))


def _check_tokens(rows, world: int) -> None:
    per_step = B * T * 2 * world  # micro-batches of 2 per optimizer step, on every rank
    # one value per optimizer step (Lightning repeats a step's values at the next micro-batch's row)
    seen = list(dict.fromkeys(float(r["tokens"]) for r in rows if r.get("tokens")))
    assert seen == [per_step * k for k in range(1, 7)]  # 3 optimizer steps per epoch, 2 epochs
    assert [float(r["val/tokens"]) for r in rows if r.get("val/tokens")] == [per_step * 3, per_step * 6]


def test_tokens_rates_mfu_and_eta(make_cfg):
    cfg = make_cfg(GPT_RUN, tiny="run")
    _, objects = train(cfg)
    rows = _rows(cfg)
    _check_tokens(rows, world=1)
    flops, _ = model_flops_per_token(objects["model"].net, T)
    rated = [r for r in rows if r.get("perf/tokens_per_s")]
    assert rated and all(r.get("perf/mfu") and r.get("perf/eta_h") for r in rated)
    for r in rated:
        rate, mfu = float(r["perf/tokens_per_s"]), float(r["perf/mfu"])
        assert rate > 0 and mfu == pytest.approx(flops * rate / 1e8, rel=1e-5)  # peak 1e-4 TFLOP/s
    eta = [float(r["perf/eta_h"]) for r in rated]
    assert eta[-1] == 0.0 and all(e > 0 for e in eta[:-1])  # steps left x seconds per step; none left at the end


def test_tokens_count_every_rank(make_cfg):
    cfg = make_cfg([*GPT_RUN, "trainer=ddp_sim"], tiny="run")
    _, objects = train(cfg)
    assert objects["trainer"].world_size == 2
    _check_tokens(_rows(cfg), world=2)


def test_inert_on_other_data(make_cfg):
    cfg = make_cfg(["logger=csv", "+callbacks.throughput._target_=flatsophia.callbacks.LMThroughput"])
    train(cfg)
    assert not any(k.startswith(("tokens", "perf/", "val/tokens")) for k in _rows(cfg)[0])
