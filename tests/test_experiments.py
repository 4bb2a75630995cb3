"""The paper-scale experiments: values equal their sources (the table of docs/experiments.md), each
optimizer gets its own values (conf/per_optimizer), the global batch is checked, and every new
experiment trains on CPU with a tiny model on token files."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY_TOKENS
from flatsophia import validation
from flatsophia.training import train
from flatsophia.validation import check_global_batch, check_per_optimizer, device_count, validate_config

ROOT = Path(__file__).resolve().parents[1]
NEW_EXPERIMENTS = ("gpt2_small", "gpt2_medium", "gpt2_large")


def doc_rows() -> list[tuple[str, str, str, str]]:
    """(experiment, optimizer, key, value) of each row of the table in docs/experiments.md."""
    text = (ROOT / "docs" / "experiments.md").read_text()
    table = text[text.index("| experiment | optimizer | key | value | source |") :]
    rows = []
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        exp, opt, key, value, _source = (c.strip() for c in line.strip("|").split(" | "))
        rows.append((exp, opt, key.strip("`"), value))
    return rows


def per_optimizer_files() -> dict[str, list[str]]:
    """{experiment: optimizers with a conf/per_optimizer/<optimizer>_<experiment>.yaml}."""
    optimizers = sorted(p.stem for p in (ROOT / "conf" / "optimizer").glob("*.yaml"))
    out = defaultdict(list)
    for path in (ROOT / "conf" / "per_optimizer").glob("*.yaml"):
        opt = next(o for o in sorted(optimizers, key=len, reverse=True) if path.stem.startswith(o + "_"))
        out[path.stem[len(opt) + 1 :]].append(opt)
    return out


def parse(value: str):
    if value.endswith(" x module.accumulate"):
        return ("per accumulate", int(value.split()[0]))
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def same(got, want) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return got is not None and math.isclose(float(got), float(want), rel_tol=1e-9)
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    return got == want


def test_config_values_equal_the_documented_sources(make_cfg):
    """Each row of docs/experiments.md holds in the composed config (`all`: for every optimizer the
    experiment has settings for), and each per-optimizer file's optimizer keys have a row."""
    rows, files = doc_rows(), per_optimizer_files()
    assert len(rows) > 150
    wanted = defaultdict(list)
    for exp, opt, key, value in rows:
        for name in files[exp] if opt == "all" else [opt]:
            wanted[(exp, name)].append((key, parse(value)))
    for exp, optimizers in files.items():  # every per-optimizer file is documented
        for opt in optimizers:
            if opt == "sophia":  # the alias of sophia_g
                continue
            raw = OmegaConf.load(ROOT / "conf" / "per_optimizer" / f"{opt}_{exp}.yaml")
            keys = {key for key, _ in wanted[(exp, opt)]}
            missing = [f"optimizer.{k}" for k in raw.optimizer if f"optimizer.{k}" not in keys]
            assert not missing, f"{opt}_{exp}.yaml sets {missing} without a row in docs/experiments.md"
    for (exp, opt), checks in sorted(wanted.items()):
        cfg = make_cfg([f"experiment={exp}", f"optimizer={opt}"], tiny=False)
        for key, want in checks:
            if key == "min_lr":
                got = cfg.optimizer.lr * cfg.scheduler.min_lr_ratio
            elif isinstance(want, tuple):
                got, want = OmegaConf.select(cfg, key), want[1] * cfg.module.accumulate
            else:
                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert same(got, want), f"experiment={exp} optimizer={opt}: {key} = {got!r}, docs say {want!r}"


def test_each_optimizer_gets_its_own_values_and_names_their_source(make_cfg):
    adamw = make_cfg(["experiment=gpt2_small", "optimizer=adamw"], tiny=False)
    sophia = make_cfg(["experiment=gpt2_small", "optimizer=sophia_g"], tiny=False)
    alias = make_cfg(["experiment=gpt2_small", "optimizer=sophia"], tiny=False)
    assert adamw.settings_source.endswith("config/train_gpt2_small_adam.py")
    assert sophia.settings_source == alias.settings_source
    assert sophia.settings_source.endswith("config/train_gpt2_small_sophiag.py")
    assert (list(adamw.optimizer.betas), adamw.optimizer.weight_decay) == ([0.9, 0.95], 0.1)
    assert list(sophia.optimizer.betas) == [0.965, 0.99]
    assert (sophia.optimizer.rho, sophia.optimizer.weight_decay) == (0.05, 0.2)
    assert adamw.data == sophia.data and adamw.model == sophia.model  # the experiment's shared part
    charlm = make_cfg(["experiment=sophia_charlm", "optimizer=sophia_g"], tiny=False)
    assert charlm.optimizer.rho == 0.05  # could not be set before per-optimizer files
    cli = make_cfg(["experiment=gpt2_small", "optimizer=sophia_g", "optimizer.rho=0.03"], tiny=False)
    assert cli.optimizer.rho == 0.03  # the command line still wins
    plain = make_cfg(["optimizer=adamw"], tiny=False)
    assert plain.settings_source is None


def test_an_optimizer_without_settings_is_refused(make_cfg, monkeypatch):
    cfg = make_cfg(["experiment=gpt2_small", "optimizer=soap"], tiny=False)
    check_per_optimizer(cfg)  # soap has its file
    real = validation.group_options

    def without_soap(group):
        options = real(group)
        return {k: v for k, v in options.items() if k != "soap_gpt2_small"} if group == "per_optimizer" else options

    monkeypatch.setattr(validation, "group_options", without_soap)
    with pytest.raises(ValueError, match=r"experiment=gpt2_small has per-optimizer settings for adamw, .*"
                                         r"none for optimizer=soap.*conf/per_optimizer/soap_gpt2_small.yaml"):
        check_per_optimizer(cfg)


def test_global_batch_is_checked_against_the_intended_tokens_per_step(make_cfg):
    cfg = make_cfg(["experiment=gpt2_small"], tiny=False)
    check_global_batch(cfg)  # 12 x 5 x 8 GPUs x 1 node x 1024 = 491,520
    four = make_cfg(["experiment=gpt2_small", "trainer.devices=4"], tiny=False)
    with pytest.raises(ValueError, match=(
        r"data.batch_size=12 x module.accumulate=5 x trainer.devices=4 x trainer.num_nodes=1 sequences of "
        r"data.block_size=1024 tokens = 245,760 .* data.tokens_per_step=491,520 \(480 sequences\)"
        r".*\(module.accumulate=10 fits\)")):
        check_global_batch(four)
    check_global_batch(make_cfg(["experiment=gpt2_small", "trainer.devices=4", "module.accumulate=10"], tiny=False))
    nodes = make_cfg(["experiment=gpt2_medium", "trainer.num_nodes=2", "data.batch_size=7"], tiny=False)
    with pytest.raises(ValueError, match=r"trainer.num_nodes=2 .* = 1,146,880 tokens") as err:
        check_global_batch(nodes)
    assert "fits" not in str(err.value)  # 480 is not a multiple of 7 x 8 x 2 = 112
    unchecked = make_cfg(["experiment=gpt2_small", "data.tokens_per_step=null", "trainer.devices=3"], tiny=False)
    check_global_batch(unchecked)


def test_device_count_counts_as_lightning():
    assert device_count({"devices": [0, 1]}) == 2
    assert device_count(OmegaConf.create({"devices": [0, 1, 3]})) == 3
    assert device_count({"devices": "0,1,2"}) == 3
    assert device_count({"devices": "auto", "accelerator": "cpu"}) == 1
    assert device_count({"devices": 4, "accelerator": "gpu"}) == 4


def test_token_data_needs_a_step_limit(make_cfg, token_files):
    cfg = make_cfg(["data=tokens", f"data.data_dir={token_files.parent}", *TINY_TOKENS, "trainer.max_epochs=3"],
                   tiny=False)
    with pytest.raises(ValueError, match=r"data=tokens streams training windows without end.*set trainer.max_steps"):
        validate_config(cfg)


def tiny_run(experiment: str, optimizer: str, token_files: Path) -> list[str]:
    """The experiment on CPU with a 1-layer model on the fixture's files: 2 optimizer steps of 2
    accumulated micro-batches of 2 x 16 tokens (tokens_per_step 64, checked)."""
    return [
        f"experiment={experiment}",
        f"optimizer={optimizer}",
        f"data.data_dir={token_files.parent}",
        *TINY_TOKENS,
        "data.tokens_per_step=64",
        "module.accumulate=2",
        "trainer=cpu",
        "trainer.devices=1",
        "trainer.num_nodes=1",
        "trainer.precision=32-true",
        "trainer.max_steps=2",
        "trainer.num_sanity_val_steps=0",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "scheduler.warmup_steps=1",
        "logger=none",
        "callbacks=none",
        "torch_num_threads=1",
        "test=false",  # trainer.test would replace the training metrics checked below
    ]


@pytest.mark.parametrize(("experiment", "optimizer"), [("gpt2_small", "sophia_g"), ("gpt2_medium", "adamw"),
                                                       ("gpt2_large", "flat_sophia")])
def test_new_experiments_train_two_steps_on_cpu(make_cfg, token_files, experiment, optimizer):
    assert experiment in NEW_EXPERIMENTS
    cfg = make_cfg(tiny_run(experiment, optimizer, token_files), tiny=False)
    metrics, objects = train(cfg)
    trainer, module = objects["trainer"], objects["model"]
    assert trainer.global_step == 2
    assert math.isfinite(metrics["val/loss"])
    net = module.net
    assert net.blocks[0].attn.scale == pytest.approx(1 / math.sqrt(16 // 2))  # layer 0: / (0 + 1)
    assert "wte.weight" in net.no_weight_decay()
    if optimizer == "sophia_g":  # Sophia-G's bs = the tokens of one optimizer step = data.tokens_per_step
        assert trainer.callback_metrics["train/sophia_bs"].item() == 64
    assert objects["datamodule"].state_dict()["train_batches"] == 4  # 2 steps x 2 micro-batches
