"""The benchmark script runs end to end on a tiny model and reports consistent numbers.

Runs ``flatsophia.bench.benchmark`` (``scripts/benchmark.py``) with ``--smoke``,
in-process (one thread, no torch.compile, two rounds).
Timings themselves are not checked (machines differ); their presence and sanity are, and the
optimizer-state sizes, which are exact:

* state bytes per parameter count every tensor in ``optimizer.state`` with at least one dimension;
  the 0-d ``step`` counters (4 bytes per parameter *tensor*, not per element) are excluded from the
  headline figure and reported separately as ``bytes_per_param_incl_scalars``.
* fp32 SophiaG / SophiaH: exp_avg + hessian = 8 bytes; FlatSophia adds the int8 mask = 9.
"""

from __future__ import annotations

import json
import math

import pytest


def _load():
    from flatsophia.bench import benchmark

    return benchmark


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("timm")
    bench = _load()
    path = tmp_path_factory.mktemp("bench") / "b.json"
    res = bench.main(["--smoke", "--quiet", "--json", str(path)])
    return bench, res, path


def _finite_pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


OURS_AND_BASELINES = ("adamw_fused", "adamw", "sophia_g", "sophia_h", "flat_sophia")


def test_step_rows_for_every_optimizer(smoke):
    bench, res, _ = smoke
    step = res["step"]
    assert set(bench.OPTIMIZERS) <= set(step)
    for name, variants in step.items():
        # eager and torch.compile of the step function (CPU: no foreach=False "loop" row)
        assert set(variants) == {"eager", "compiled"}
        eager = variants["eager"]
        if name in OURS_AND_BASELINES:
            assert eager["status"] == "ok", (name, eager)
        if eager["status"] != "ok":
            # only optional third-party / in-progress optimizers may be skipped, and with a reason
            assert name in ("sophia_opt", "po_soap", "soap") and eager["note"], (name, eager)
            continue
        for key in ("median_ms", "min_ms", "max_ms", "ratio_vs_fused_adamw"):
            assert _finite_pos(eager[key]), (name, key, eager[key])
        assert eager["min_ms"] <= eager["median_ms"] <= eager["max_ms"]
        assert eager["iqr_ms"] >= 0 and eager["n"] >= 2
        # --smoke does not compile; the row says so instead of holding numbers.
        assert variants["compiled"]["status"] == "skipped" and variants["compiled"]["note"], name
    assert step["adamw_fused"]["eager"]["ratio_vs_fused_adamw"] == pytest.approx(1.0)
    # Paired ratios: one round median per round, and the baseline paired with itself is exactly 1.
    assert step["adamw_fused"]["eager"]["paired_ratio_vs_fused_adamw"] == 1.0
    for name in ("sophia_g", "sophia_h", "flat_sophia"):
        eager = step[name]["eager"]
        assert len(eager["round_medians_ms"]) == 2 and all(_finite_pos(t) for t in eager["round_medians_ms"])
        assert _finite_pos(eager["paired_ratio_vs_fused_adamw"])
    assert res["iteration"]["adamw_fused"]["paired_ratio_vs_fused_adamw"] == 1.0
    assert _finite_pos(res["iteration"]["sophia_h"]["paired_ratio_vs_fused_adamw"])


def test_paired_ratio_pairs_rounds_and_skips_missing_ones():
    bench = _load()
    row = {"round_medians_ms": [2.0, 9.0, None, 4.0]}
    base = {"round_medians_ms": [1.0, 3.0, 1.0, 1.0]}
    # per round: 2, 3, (skipped), 4 -> median 3; the ratio of medians would be 4.0 / 1.0 = 4
    assert bench.paired_ratio(row, base) == 3.0
    assert bench.paired_ratio(row, {"round_medians_ms": None}) is None
    assert bench.paired_ratio({"round_medians_ms": [None]}, {"round_medians_ms": [1.0]}) is None


def test_median_ci_ranks_and_coverage():
    bench = _load()
    assert bench.median_ci([1.0] * 5) is None  # [min, max] covers only 1 - 2/32 < 95 %
    lo, hi, cov = bench.median_ci([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    assert (lo, hi) == (1.0, 6.0) and cov == pytest.approx(1 - 2 / 64)
    lo, hi, cov = bench.median_ci([float(i) for i in range(15, 0, -1)])
    # P(Bin(15, 1/2) <= 3) = 576 / 32768: ranks 4 and 12 of 15
    assert (lo, hi) == (4.0, 12.0) and cov == pytest.approx(1 - 2 * 576 / 32768)
    # The stated coverage holds: intervals from skewed samples contain the true median that often.
    import random

    rng = random.Random(0)
    for n in (8, 15, 30):
        hits, trials = 0, 3000
        for _ in range(trials):
            lo, hi, cov = bench.median_ci([rng.expovariate(1.0) for _ in range(n)])
            hits += lo <= math.log(2) <= hi
        assert abs(hits / trials - cov) < 0.02, (n, hits / trials, cov)


def test_verdict_uses_the_interval():
    bench = _load()
    assert bench.verdict((0.9, 0.99, 0.96), 0.95, 1.0) == "met"
    assert bench.verdict((1.01, 1.2, 0.96), 1.1, 1.0) == "missed"
    assert bench.verdict((0.95, 1.05, 0.96), 0.97, 1.0) == "within noise"
    assert bench.verdict(None, 0.97, 1.0) == "met (point)"
    assert bench.verdict(None, 1.03, 1.0) == "missed (point)"
    # Targets built from rounds: a candidate 0.9-1.1x the baseline round by round straddles 1.00.
    base = {"status": "ok", "median_ms": 1.0, "round_medians_ms": [1.0] * 8}
    near = {"status": "ok", "median_ms": 0.98, "round_medians_ms": [0.9, 1.1, 0.95, 1.05, 0.97, 1.02, 0.99, 1.01]}
    fast = {"status": "ok", "median_ms": 0.8, "round_medians_ms": [0.8, 0.82, 0.79, 0.81, 0.8, 0.83, 0.78, 0.8]}
    res = {"step": {"adamw_fused": {"eager": base}, "sophia_g": {"eager": near}, "sophia_h": {"eager": fast}}}
    by_name = {t["name"]: t for t in bench.evaluate_targets(res)}
    g = by_name["sophia_g step, fastest path <= 1.00x fused AdamW"]
    assert g["passed"] is True and g["verdict"] == "within noise"
    assert g["ci"][0] == 0.9 and g["ci"][1] == 1.1  # 8 rounds: [min, max] (99.2 %)
    h = by_name["sophia_h step, fastest path <= 1.00x fused AdamW"]
    assert h["verdict"] == "met" and h["paired"] == pytest.approx(0.8)
    assert "| within noise |" in bench.markdown({"meta": _META, "targets": list(by_name.values())})


_META = dict(model_desc="m", n_params=1, n_tensors=1, torch="t", threads=1, cpu="c", rounds=8)


def test_refresh_iteration_hvp_rows(smoke):
    _, res, _ = smoke
    for name in ("sophia_g", "sophia_h", "flat_sophia"):
        for sect in ("refresh", "iteration"):
            row = res[sect][name]
            assert row["status"] == "ok", (sect, name, row)
            assert _finite_pos(row["median_ms"]) and _finite_pos(row["ratio_vs_fused_adamw"]), (sect, name, row)
    for name in ("adamw_fused", "adamw"):
        assert _finite_pos(res["iteration"][name]["ratio_vs_fused_adamw"])
    assert res["iteration"]["adamw_fused"]["ratio_vs_fused_adamw"] == pytest.approx(1.0)
    hvp = res["hvp"]
    assert _finite_pos(hvp["rev_over_rev"]["median_ms"]) and _finite_pos(hvp["fwd_over_rev"]["median_ms"])
    assert hvp["faster"] in ("rev_over_rev", "fwd_over_rev")
    den = res["denormal"]
    assert _finite_pos(den["ftz_off"]["median_ms"])
    assert den["ftz_on"]["status"] in ("ok", "skipped")


def test_state_bytes_exact(smoke):
    _, res, _ = smoke
    st = res["state"]
    assert st["sophia_g"]["bytes_per_param"] == 8.0
    assert st["sophia_h"]["bytes_per_param"] == 8.0
    assert st["flat_sophia"]["bytes_per_param"] == 9.0
    assert st["adamw_fused"]["bytes_per_param"] == 8.0
    # the 0-d step counters are the only difference between the two figures
    n = res["meta"]["n_params"]
    n_tensors = res["meta"]["n_tensors"]
    for name in ("sophia_g", "sophia_h", "flat_sophia"):
        extra = (st[name]["bytes_per_param_incl_scalars"] - st[name]["bytes_per_param"]) * n
        assert extra == pytest.approx(4 * n_tensors)


def test_memory_and_targets(smoke):
    _, res, _ = smoke
    rows = res["memory"]["rows"]
    for name in ("fwd_bwd", "sophia_g", "sophia_h", "flat_sophia"):
        assert rows[name]["peak_bytes"] > 0
    # A Hutchinson refresh keeps the double-backward graph: it needs more than a forward+backward.
    assert rows["sophia_h"]["peak_bytes"] > rows["fwd_bwd"]["peak_bytes"]
    names = [t["name"] for t in res["targets"]]
    assert any("state bytes" in n for n in names) and any("iteration" in n for n in names)
    for t in res["targets"]:
        if "state bytes" in t["name"]:
            assert t["passed"] is True, t
        if t["value"] is not None:
            assert math.isfinite(t["value"]) and t["value"] > 0
            assert t["passed"] in (True, False)
            assert t["verdict"] in ("met", "missed", "within noise", "met (point)", "missed (point)"), t
    # --smoke has two rounds: too few for an interval, so no target claims one
    assert all(t["ci"] is None for t in res["targets"])


def test_markdown_and_json_match(smoke):
    bench, res, path = smoke
    md = res["markdown"]
    for name in bench.OPTIMIZERS:
        assert bench.OPTIMIZERS[name][0] in md
    assert "| target |" in md and ("PASS" in md or "FAIL" in md)
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(res))


def test_fused_refresh_iteration_rows(smoke):
    """The iteration section also times the module's code path: the refresh shares the training
    forward through the estimator's ``from_loss`` (GNB and Hutchinson)."""
    _, res, _ = smoke
    it = res["iteration"]
    for name in ("sophia_g", "sophia_h", "flat_sophia"):
        row = it[name + "+fused"]
        assert row["status"] == "ok" and row["refresh"] == "fused" and row["step_path"] == "eager", row
        assert _finite_pos(row["median_ms"]) and "from_loss" in row["note"]
        assert it[name]["refresh"] == "separate"
    sophia = ("sophia_g", "sophia_h", "flat_sophia")
    assert set(it) == {"adamw_fused", "adamw", *sophia, "soap", *(f"{n}+fused" for n in sophia)}
    soap = it["soap"]  # SOAP's own eigenbasis refresh is inside step(): one per 10-iteration block
    assert soap["status"] == "ok" and _finite_pos(soap["median_ms"]) and "eigenbasis" in soap["note"]
    details = [t["detail"] for t in res["targets"] if "iteration" in t["name"]]
    assert details and all("fastest = " in d for d in details)


def test_device_argument_is_validated():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "tpu"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
    assert bench.parse_args(["--smoke"]).device == "cpu"


def test_soap_flops_at_the_algorithms_floor(smoke):
    """Counted matmul FLOPs of our SOAP equal the analytic floor (no redundant rotation or product);
    pytorch_optimizer's SOAP, when installed, does at least as much matmul work."""
    _, res, _ = smoke
    fl = res["flops"]
    ours = fl["soap"]
    assert ours["status"] == "ok" and ours["steps"] == 10
    assert _finite_pos(ours["gflop_per_step"])
    assert ours["gflop_per_step"] == pytest.approx(ours["floor_gflop_per_step"], rel=1e-12)
    theirs = fl.get("po_soap", {})
    if theirs.get("status") == "ok":
        assert theirs["gflop_per_step"] >= ours["gflop_per_step"]
        assert fl["floor_vs_theirs"] == pytest.approx(ours["floor_gflop_per_step"] / theirs["gflop_per_step"])
    assert "SOAP matmul work" in res["markdown"]


def test_soap_flop_floor_by_hand():
    """The floor formula on one 2-D tensor, worked out by hand (refresh every 10 steps)."""
    import torch

    from flatsophia.optim import SOAP

    bench = _load()
    p = torch.nn.Parameter(torch.zeros(6, 4))
    opt = SOAP([p], precondition_frequency=10)
    p.grad = torch.randn(6, 4)
    opt.step()  # builds the factors (6x6 and 4x4)
    n, sd, cubes = 24, 10, 2 * (6**3 + 4**3)
    # per step 6*N*sum(d); per refresh the power iteration (cubes) and min(4*N*sd, cubes + 2*N*sd)
    expected = 6 * n * sd + (cubes + min(4 * n * sd, cubes + 2 * n * sd)) / 10
    assert bench.soap_flop_floor(opt) == pytest.approx(expected)
    # 2-D: the round trip (4*N*sd = 960) is cheaper than composing (560 + 480 = 1040)
    assert expected == 6 * 24 * 10 + (560 + 960) / 10


def test_model_from_an_experiment_config():
    """``--model experiment=<name>`` times the project's own model of a language-model experiment."""
    bench = _load()
    model, x, y, preds, desc = bench.build_model("experiment=sophia_charlm", "base", None, 0)
    from flatsophia.models.components.gpt import GPT

    assert isinstance(model, GPT) and "experiment=sophia_charlm" in desc
    assert tuple(x.shape) == (16, 128) and y.shape == (16 * 128,) and preds == 16 * 128
    assert model(x[:2]).shape == (2, 128, 256)
    assert bench.parse_args(["--model", "experiment=sophia_charlm"]).model == "experiment=sophia_charlm"
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "resnet"])
    with pytest.raises(SystemExit, match="only language-model"):
        bench.build_model("experiment=flat_sophia_overfit", "base", None, 0)
