"""The benchmark (``python -m flatsophia.bench``) runs end to end and its numbers are consistent.

The smoke run (tiny ViT, one thread, two rounds, no ``torch.compile``) runs in-process once. No
wall-clock figure is checked against another (machines differ and may be busy); what is checked is
that every section has every row, that the ratios follow from the medians, and the quantities that
are exact: optimizer state bytes, FLOP counts, the refresh schedule, the statistics.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch

from flatsophia.bench import report, timing, workloads
from flatsophia.bench.cli import main, parse_args
from flatsophia.bench.sections import state_bytes, training_step
from flatsophia.hessian import HessianRefresher
from flatsophia.optim import OPTIMIZERS


def expected_rows() -> list[str]:
    """Iteration rows: every registered optimizer (one per hvp form for Hutchinson), the baselines."""
    keys = ["adamw_fused"]
    for name, spec in OPTIMIZERS.items():
        keys += [f"{name}/autograd", f"{name}/finite_difference"] if spec.hessian == "hutchinson" else [name]
    return [*keys, "sophia_opt"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    res = main(["--smoke", "--quiet", "--json", str(path)])
    return res, path


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _ok_rows(section: dict) -> dict:
    return {k: r for k, r in section["rows"].items() if r["status"] == "ok"}


def test_every_section_and_row(smoke):
    res, _ = smoke
    assert res["complete"] is True
    assert list(res["iteration"]["rows"]) == expected_rows()
    second_order = [k for k in expected_rows() if workloads.hessian_of(k.split("/")[0]) != "none"]
    assert list(res["refresh"]["rows"]) == ["fwd_bwd", *second_order]
    assert list(res["memory"]["rows"]) == ["fwd_bwd", *second_order]
    step_keys = ["adamw_fused"]
    for name in OPTIMIZERS:
        step_keys += [f"{name}/single", f"{name}/multi"] if workloads.kernels(name) != (None,) else [name]
    assert list(res["step"]["rows"]) == [*step_keys, "sophia_opt"]
    assert {"sophia_g/single", "sophia_g/multi", "flat_sophia/multi", "adamw/single"} <= set(step_keys)
    assert list(res["state"]["rows"]) == workloads.optimizer_names()
    for sec in ("iteration", "refresh", "step", "state", "memory"):
        for key, row in res[sec]["rows"].items():
            assert row["status"] == "ok", (sec, key, row)
    # --smoke never compiles; the meta says what ran
    assert not any(k.endswith("/compiled") for k in res["step"]["rows"])
    m = res["meta"]
    assert m["smoke"] and m["threads"] == 1 and m["rounds"] == 2 and m["k"] == 10
    assert m["command"].startswith("python -m flatsophia.bench --smoke")
    assert m["torch"] == torch.__version__ and m["n_params"] == 15242
    for key in ("machine", "device", "date", "git_commit", "loadavg_start", "loadavg_end", "wall_s"):
        assert key in m


def test_ratios_follow_from_the_medians(smoke):
    res, _ = smoke
    for sec in ("iteration", "refresh", "step"):
        rows = _ok_rows(res[sec])
        base = rows[res[sec]["reference"]]
        assert base["ratio"] == 1.0 and base["paired"] == 1.0
        for key, row in rows.items():
            assert row["n"] >= 2 and len(row["round_medians_ms"]) == 2, (sec, key)
            assert row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["iqr_ms"] >= 0
            assert row["ratio"] == pytest.approx(row["median_ms"] / base["median_ms"])
            per_round = [a / b for a, b in zip(row["round_medians_ms"], base["round_medians_ms"])]
            assert row["paired"] == pytest.approx(statistics.median(per_round))
            assert row["ci"] is None  # two rounds: too few for a 95 % interval
    # iteration samples are means of k iterations: one per round
    assert all(r["n"] == 2 for r in _ok_rows(res["iteration"]).values())


def test_refresh_flops_and_floors(smoke):
    """FLOPs are counted, not timed: the two-gradient refresh costs exactly one more forward+backward
    (as does the authors' separate refresh); the double backward costs more; GNB's extra backward less."""
    res, _ = smoke
    rows, k = res["refresh"]["rows"], res["refresh"]["k"]
    assert rows["fwd_bwd"]["flop_ratio"] == 1.0 and _pos(rows["fwd_bwd"]["gflop"])
    for name in ("sophia_h", "flat_sophia"):
        assert rows[f"{name}/finite_difference"]["flop_ratio"] == 2.0
        assert rows[f"{name}/autograd"]["flop_ratio"] > 2.5
    assert 1.5 < rows["sophia_g"]["flop_ratio"] < 2.0
    assert rows["sophia_opt"]["flop_ratio"] == 2.0
    for row in _ok_rows(res["refresh"]).values():
        assert row["iteration_floor"] == pytest.approx(1 + (row["flop_ratio"] - 1) / k)


def test_state_bytes_exact(smoke):
    res, _ = smoke
    rows, n, n_tensors = res["state"]["rows"], res["meta"]["n_params"], res["meta"]["n_tensors"]
    expected = {"adamw_fused": 8, "adamw": 8, "sophia_g": 8, "sophia_h": 8, "flat_sophia": 9, "sophia_opt": 8}
    for name, b in expected.items():
        assert rows[name]["bytes_per_param"] == b, name
        # the 0-d float32 step counters, one per parameter tensor, are the only difference
        assert rows[name]["bytes_with_counters"] - rows[name]["bytes"] == 4 * n_tensors, name
    # SOAP: both Adam moments, plus GG and Q (d x d each) for every dimension of a matrix or kernel
    model = workloads.build_workload("smoke").model
    soap = sum(8 * p.numel() + (8 * sum(d * d for d in p.shape) if p.ndim >= 2 else 0) for p in model.parameters())
    assert rows["soap"]["bytes"] == soap
    assert rows["soap"]["bytes_per_param"] == soap / n


def test_state_bytes_counts_shared_tensors_once():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    shared = torch.zeros(3, 4)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"a": shared, "b": [shared, torch.zeros(())], "c": {"d": torch.zeros(2, dtype=torch.int8)}}
    assert state_bytes(opt) == (48 + 2, 48 + 2 + 4)


def test_memory_of_the_refresh(smoke):
    """Peak memory is a count of allocations (deterministic): the double backward keeps the gradient's
    graph, the two-gradient form does not."""
    res, _ = smoke
    rows = res["memory"]["rows"]
    assert _pos(rows["fwd_bwd"]["peak_mib"]) and rows["fwd_bwd"]["ratio"] == 1.0
    for name in ("sophia_h", "flat_sophia"):
        assert rows[f"{name}/autograd"]["peak_mib"] > rows[f"{name}/finite_difference"]["peak_mib"]
        assert rows[f"{name}/autograd"]["peak_mib"] > rows["fwd_bwd"]["peak_mib"]


def test_json_and_report(smoke, tmp_path):
    res, path = smoke
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    md = report.markdown(res)
    for sec in (
        "**Training iteration**",
        "**Refresh step**",
        "**Optimizer step**",
        "**Optimizer state**",
        "**Peak memory",
    ):
        assert sec in md
    assert md.count("| sophia_h | finite_difference |") == 3  # iteration, refresh, memory
    assert "| flat_sophia | 9.0000 | " in md
    # the report's command line rewrites a document's block for that JSON, and only that block
    doc = tmp_path / "doc.md"
    other = "keep\n<!-- bench: other.json -->\nx\n<!-- /bench -->\n"
    doc.write_text(f"# t\n<!-- bench: smoke.json -->\nold\n<!-- /bench -->\n{other}")
    report.main([str(path), "--update", str(doc)])
    assert doc.read_text() == f"# t\n<!-- bench: smoke.json -->\n{md}<!-- /bench -->\n{other}"
    with pytest.raises(ValueError, match="no block"):
        report.update_document("nothing here", "smoke.json", md)


def test_performance_doc_tables_come_from_the_committed_json():
    """Each generated block of docs/performance.md is the report of its JSON under docs/results/bench/
    (regenerate with ``python -m flatsophia.bench.report <json> --update docs/performance.md``)."""
    root = Path(__file__).resolve().parents[1]
    blocks = list(report.BLOCK.finditer((root / "docs" / "performance.md").read_text()))
    assert [b["name"] for b in blocks] == ["cpu.json", "cuda.json"]
    for block in blocks:
        path = root / "docs" / "results" / "bench" / block["name"]
        if path.exists():
            assert block["body"] == report.markdown(json.loads(path.read_text())), block["name"]
        else:
            assert block["body"] == "Not measured yet.\n", block["name"]


def test_training_step_refreshes_once_every_k():
    """The iteration section's loop is HessianRefresher's plain loop: one refresh per k steps, for
    every estimator and hvp form."""
    w = workloads.build_workload("smoke")
    forward, loss_fn = w.closures(w.model)
    for name, hvp in (("sophia_g", "autograd"), ("sophia_h", "autograd"), ("flat_sophia", "finite_difference")):
        opt = workloads.make_optimizer(name, w.model, w.predictions)  # SophiaG: bs = predictions per step
        refresher = (
            HessianRefresher(opt, model=w.model, every_k=5, hvp=hvp)
            if name != "sophia_g"
            else HessianRefresher(opt, model=w.model, every_k=5)
        )
        for step in range(12):
            training_step(opt, refresher, forward, loss_fn, step)
            assert all(p.grad is None for p in w.model.parameters())  # zero_grad ends every iteration
        assert refresher.refreshes == 3 and refresher.skipped == 0, name  # steps 0, 5, 10


def test_paired_ratios_and_intervals():
    rows = {
        "ref": {"median_ms": 1.0, "round_medians_ms": [1.0, 3.0, 1.0, 1.0]},
        "a": {"median_ms": 4.0, "round_medians_ms": [2.0, 9.0, 1.0, 4.0]},
        "gone": {"median_ms": None},
    }
    timing.add_ratios(rows, "ref")
    # per round 2, 3, 1, 4 -> median 2.5; the ratio of the medians is 4
    assert rows["a"]["paired"] == 2.5 and rows["a"]["ratio"] == 4.0 and rows["a"]["ci"] is None
    assert "paired" not in rows["gone"]
    eight = {
        "ref": {"median_ms": 1.0, "round_medians_ms": [1.0] * 8},
        "b": {"median_ms": 1.0, "round_medians_ms": [0.9, 1.1, 0.95, 1.05, 0.97, 1.02, 0.99, 1.01]},
    }
    timing.add_ratios(eight, "ref")
    assert eight["b"]["ci"] == [0.9, 1.1, pytest.approx(1 - 2 / 256)]  # 8 rounds: [min, max]


def test_median_ci_ranks_and_coverage():
    assert timing.median_ci([1.0] * 5) is None  # [min, max] covers only 1 - 2/32 < 95 %
    lo, hi, cov = timing.median_ci([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    assert (lo, hi) == (1.0, 6.0) and cov == pytest.approx(1 - 2 / 64)
    lo, hi, cov = timing.median_ci([float(i) for i in range(15, 0, -1)])
    # P(Bin(15, 1/2) <= 3) = 576 / 32768: ranks 4 and 12 of 15
    assert (lo, hi) == (4.0, 12.0) and cov == pytest.approx(1 - 2 * 576 / 32768)
    # The stated coverage holds: intervals from skewed samples contain the true median that often.
    rng = random.Random(0)
    for n in (8, 15, 30):
        hits, trials = 0, 3000
        for _ in range(trials):
            lo, hi, cov = timing.median_ci([rng.expovariate(1.0) for _ in range(n)])
            hits += lo <= math.log(2) <= hi
        assert abs(hits / trials - cov) < 0.02, (n, hits / trials, cov)


def test_summarize():
    s = timing.summarize([0.004, 0.001, 0.002, 0.003], [0.0025])
    assert s["median_ms"] == pytest.approx(2.5) and s["min_ms"] == 1.0 and s["max_ms"] == 4.0
    assert s["iqr_ms"] == pytest.approx(1.5) and s["n"] == 4 and s["round_medians_ms"] == [2.5]
    assert timing.summarize([], [])["median_ms"] is None


def test_arguments_are_validated():
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "resnet"])
    with pytest.raises(SystemExit):
        parse_args(["--sections", "step,denormal"])
    with pytest.raises(SystemExit):
        parse_args(["--optimizers", "lion"])
    a = parse_args(["--optimizers", "sophia_h,adamw"])
    assert a.optimizers == ["adamw_fused", "adamw", "sophia_h"]  # the reference always runs, in table order
    a = parse_args([])
    assert (a.model, a.rounds, a.k, a.compile, a.device) == ("vit", 12, 10, False, "cpu")
    assert parse_args(["--smoke", "--compile"]).compile is False
    assert a.batch_fractions == (1,) and parse_args(["--batch-fractions", "0.25,1"]).batch_fractions == (1, 0.25)
    for bad in ("0", "1.5", "half", ","):
        with pytest.raises(SystemExit):
            parse_args(["--batch-fractions", bad])


def test_batch_fraction_rows_and_their_flops():
    """``--batch-fractions 1,0.25``: one more row per second-order form, whose refresh FLOPs are
    those of the estimate on a quarter of the batch: the split finite difference and GNB's fresh
    forward+backward add a quarter forward+backward, the double backward a quarter of its own cost."""
    res = main(
        ["--smoke", "--quiet", "--rounds", "1", "--sections", "iteration,refresh", "--batch-fractions", "1,0.25"]
        + ["--optimizers", "sophia_g,sophia_h", "--batch", "8"]
    )
    keys = ["sophia_g", "sophia_g/f=0.25", "sophia_h/autograd", "sophia_h/autograd/f=0.25"]
    keys += ["sophia_h/finite_difference", "sophia_h/finite_difference/f=0.25"]
    assert list(res["iteration"]["rows"]) == ["adamw_fused", *keys]
    assert all(r["status"] == "ok" and _pos(r["paired"]) for r in res["iteration"]["rows"].values())
    rows = res["refresh"]["rows"]
    assert rows["sophia_g/f=0.25"]["batch_fraction"] == 0.25 and "batch_fraction" not in rows["sophia_g"]
    assert rows["sophia_h/finite_difference/f=0.25"]["flop_ratio"] == pytest.approx(1.25)
    assert rows["sophia_g/f=0.25"]["flop_ratio"] == pytest.approx(1.25)
    autograd = rows["sophia_h/autograd"]["flop_ratio"]  # the training pass and the double backward, shared
    assert rows["sophia_h/autograd/f=0.25"]["flop_ratio"] == pytest.approx(1 + autograd / 4, rel=0.02)
    assert "the training pass split" in rows["sophia_h/finite_difference/f=0.25"]["note"]


def test_default_workload_is_the_benchmark_vit():
    w = workloads.build_workload("vit")
    assert w.n_params == 5_406_820 and w.n_tensors == 44 and tuple(w.inputs.shape) == (32, 3, 32, 32)
    assert w.predictions == 32 and w.targets.shape == (32,)
    again = workloads.build_workload("vit")
    assert torch.equal(w.inputs, again.inputs) and torch.equal(w.targets, again.targets)  # fixed seed


def test_optimizers_come_from_the_registry():
    model = torch.nn.Linear(4, 3)
    assert workloads.optimizer_names() == ["adamw_fused", *OPTIMIZERS, "sophia_opt"]
    ref = workloads.make_optimizer("adamw_fused", model, 7)
    assert isinstance(ref, torch.optim.AdamW) and ref.defaults["fused"] is True
    g = workloads.make_optimizer("sophia_g", model, 7, "single")
    assert g.defaults["bs"] == 7 and g.defaults["foreach"] is False
    assert workloads.make_optimizer("sophia_h", model, 7, "multi").defaults["foreach"] is True
    for name, spec in OPTIMIZERS.items():
        assert isinstance(workloads.make_optimizer(name, model, 7), spec.cls)


def test_model_from_an_experiment_config():
    """``--model experiment=<name>`` times the project's model of a language-model experiment."""
    from flatsophia.models.components import GPT

    w = workloads.build_workload("experiment=sophia_charlm")
    assert isinstance(w.model, GPT) and w.name == "experiment=sophia_charlm"
    assert tuple(w.inputs.shape) == (16, 128) and w.targets.shape == (16 * 128,) and w.predictions == 16 * 128
    forward, _ = w.closures(w.model)
    assert forward().shape == (16 * 128, 256)
    with pytest.raises(ValueError, match="only language-model"):
        workloads.build_workload("experiment=flat_sophia_overfit")
