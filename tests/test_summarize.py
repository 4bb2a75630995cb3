"""flatsophia.experiments.summarize / scripts/summarize.py on fake multirun folders with known numbers."""

from __future__ import annotations

import os
import runpy
import statistics
import sys
from pathlib import Path

import pytest

from demo_sweep import write_demo_sweep
from flatsophia.experiments.summarize import fmt_mean_std, summarize

ROOT = Path(__file__).resolve().parents[1]

# The demo sweep's numbers, restated by hand (tests/demo_sweep.py: DEMO_RUNS): val/loss and val/acc
# at steps 9, 19, 29, 39; test (loss, acc); final sharpness; time/step_ms of the four training rows.
STEPS = [9, 19, 29, 39]
VAL_LOSS = {
    ("adamw", 0): [1.00, 0.80, 0.70, 0.75],
    ("adamw", 1): [1.10, 0.90, 0.78, 0.74],
    ("sophia_h", 0): [0.90, 0.70, 0.60, 0.62],
    ("sophia_h", 1): [0.95, 0.72, 0.65, 0.61],
    ("flat_sophia", 0): [0.85, 0.66, 0.58, 0.59],
    ("flat_sophia", 1): [0.92, 0.80, 0.76, 0.80],
}
VAL_ACC_BEST = {
    ("adamw", 0): 0.70,
    ("adamw", 1): 0.66,
    ("sophia_h", 0): 0.75,
    ("sophia_h", 1): 0.75,
    ("flat_sophia", 0): 0.77,
    ("flat_sophia", 1): 0.66,
}
TEST_LOSS = {
    ("adamw", 0): 0.72,
    ("adamw", 1): 0.76,
    ("sophia_h", 0): 0.63,
    ("sophia_h", 1): 0.64,
    ("flat_sophia", 0): 0.60,
    ("flat_sophia", 1): 0.79,
}
TOP_EIG = {
    ("adamw", 0): 8.0,
    ("adamw", 1): 9.0,
    ("sophia_h", 0): 6.0,
    ("sophia_h", 1): 7.0,
    ("flat_sophia", 0): 4.0,
    ("flat_sophia", 1): 5.0,
}
MS = {
    ("adamw", 0): 11.0,
    ("adamw", 1): 12.0,
    ("sophia_h", 0): 20.0,
    ("sophia_h", 1): 22.0,
    ("flat_sophia", 0): 24.0,
    ("flat_sophia", 1): 26.0,
}
TARGET = 0.75
# first step with val/loss <= 0.75, by hand
TO_TARGET = {
    ("adamw", 0): 29,
    ("adamw", 1): 39,
    ("sophia_h", 0): 19,
    ("sophia_h", 1): 19,
    ("flat_sophia", 0): 19,
    ("flat_sophia", 1): None,
}


def _row(table, opt, setting=""):
    rows = table[(table["optimizer"] == opt) & (table["setting"] == setting)]
    assert len(rows) == 1, (opt, setting, table[["optimizer", "setting"]])
    return rows.iloc[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def demo(demo_dir):
    write_demo_sweep(demo_dir / "sweep")
    return summarize(demo_dir / "sweep", target=TARGET, out=demo_dir / "out", pair="flat_sophia,sophia_h")


def test_table_numbers(demo):
    table = demo.table
    assert list(table["optimizer"]) == ["adamw", "sophia_h", "flat_sophia"]
    assert list(table["setting"]) == ["", "", ""]
    assert demo.common == {"model": "mlp"}
    for opt in ("adamw", "sophia_h", "flat_sophia"):
        r = _row(table, opt)
        keys = [(opt, 0), (opt, 1)]
        assert r["n_seeds"] == 2 and r["seeds"] == [0, 1]
        best = [min(VAL_LOSS[k]) for k in keys]
        best_step = [STEPS[VAL_LOSS[k].index(min(VAL_LOSS[k]))] for k in keys]
        final = [VAL_LOSS[k][-1] for k in keys]
        expected = {
            "val_loss_best": best,
            "val_loss_best_step": best_step,
            "val_loss_final": final,
            "val_acc_best": [VAL_ACC_BEST[k] for k in keys],
            "test_loss": [TEST_LOSS[k] for k in keys],
            "top_eig_final": [TOP_EIG[k] for k in keys],
            "ms_per_step": [MS[k] for k in keys],
        }
        for q, values in expected.items():
            assert r[f"{q}_mean"] == pytest.approx(statistics.fmean(values)), (opt, q)
            assert r[f"{q}_std"] == pytest.approx(statistics.stdev(values)), (opt, q)
            assert r[f"{q}_n"] == 2
        reached = [TO_TARGET[k] for k in keys if TO_TARGET[k] is not None]
        assert r["steps_to_target_n"] == len(reached)
        assert r["steps_to_target_mean"] == pytest.approx(statistics.fmean(reached))
        times = [TO_TARGET[k] * MS[k] / 1000 for k in keys if TO_TARGET[k] is not None]
        assert r["time_to_target_s_mean"] == pytest.approx(statistics.fmean(times))
        assert r["time_source"] == "time/step_ms"

    # spot checks against plain numbers
    adamw = _row(table, "adamw")
    assert adamw["val_loss_best_mean"] == pytest.approx(0.72)  # (0.70 + 0.74) / 2
    assert adamw["val_loss_best_std"] == pytest.approx(0.02 * 2**0.5)  # |0.70 - 0.74| / sqrt(2)
    assert adamw["val_loss_best_step_mean"] == pytest.approx(34)  # steps 29 and 39
    assert adamw["steps_to_target_mean"] == pytest.approx(34)
    flat = _row(table, "flat_sophia")
    assert flat["steps_to_target_mean"] == 19 and flat["steps_to_target_n"] == 1  # seed 1 never reaches 0.75

    # per-run rows
    runs = demo.runs.set_index(["optimizer", "seed"])
    assert runs.loc[("flat_sophia", 1), "steps_to_target"] != runs.loc[("flat_sophia", 1), "steps_to_target"]  # NaN
    assert runs.loc[("adamw", 0), "val_loss_best_step"] == 29


def test_paired_differences(demo):
    p = demo.paired.set_index("quantity")
    best = {s: min(VAL_LOSS[("flat_sophia", s)]) - min(VAL_LOSS[("sophia_h", s)]) for s in (0, 1)}
    assert best[0] == pytest.approx(-0.02) and best[1] == pytest.approx(0.15)
    row = p.loc["best val/loss"]
    assert row["n_pairs"] == 2
    assert row["diffs"] == pytest.approx(best)
    assert row["mean_diff"] == pytest.approx(statistics.fmean(best.values()))
    assert row["std_diff"] == pytest.approx(statistics.stdev(best.values()))
    assert row["a_better"] == 1
    final = {s: VAL_LOSS[("flat_sophia", s)][-1] - VAL_LOSS[("sophia_h", s)][-1] for s in (0, 1)}
    assert p.loc["final val/loss", "diffs"] == pytest.approx(final)
    assert p.loc["final val/loss", "mean_diff"] == pytest.approx(0.08)
    test = {s: TEST_LOSS[("flat_sophia", s)] - TEST_LOSS[("sophia_h", s)] for s in (0, 1)}
    assert p.loc["test loss", "diffs"] == pytest.approx(test)


def test_markdown_and_plots(demo, demo_dir):
    out = demo_dir / "out"
    md = (out / "summary.md").read_text()
    assert md == demo.markdown
    lines = md.splitlines()
    adamw = next(line for line in lines if line.startswith("| adamw | 2 |"))
    assert fmt_mean_std(0.72, 0.02 * 2**0.5) == "0.72 ± 0.02828"
    assert "| 0.72 ± 0.02828 | 34 ± 7.071 | 0.745 ± 0.007071 |" in adamw  # best, step of best, final val loss
    assert "| 34 ± 7.071 (2/2) |" in adamw  # steps to target
    flat = next(line for line in lines if line.startswith("| flat_sophia | 2 |"))
    assert "| 19 (1/2) |" in flat
    assert "## Paired differences flat_sophia - sophia_h (same seed)" in md
    assert "| best val/loss | 2 | 0.065 ± 0.1202 | 0: -0.02, 1: 0.15 | 1/2 |" in md
    assert "not reached" in md  # flat_sophia seed 1 in the per-run table
    assert "`model=mlp`" in md
    for name in ("val_loss.png", "val_acc.png", "sharpness.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert demo.files[name] == path


# -------------------------------------------------- hand-written job folders
def _job(
    job: Path,
    overrides: list[str],
    csv: str,
    seed: int,
    hydra_opt: str | None = None,
    module_name: str | None = None,
    target: str = "flatsophia.optim.FlatSophia",
    variant: str | None = None,
) -> Path:
    (job / ".hydra").mkdir(parents=True)
    cfg = f"seed: {seed}\noptimizer:\n  _target_: {target}\n"
    if variant:
        cfg += f"variant: {variant}\n"
    if module_name:
        cfg += f"module:\n  optimizer_name: {module_name}\n"
    (job / ".hydra" / "config.yaml").write_text(cfg)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if hydra_opt:
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  runtime:\n    choices:\n      optimizer: {hydra_opt}\n")
    (job / "logs" / "csv" / "version_0").mkdir(parents=True)  # any depth inside the job folder
    (job / "logs" / "csv" / "version_0" / "metrics.csv").write_text(csv)
    return job


def _csv(losses: list[float], extra: str = "") -> str:
    head = "epoch,step,val/loss" + ("," + extra if extra else "")
    rows = [f"{i},{10 * i + 9},{v}" + ("," if extra else "") for i, v in enumerate(losses)]
    return "\n".join([head, *rows]) + "\n"


def test_settings_grouping_pairing_and_fallbacks(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # sweep a: flat_sophia over sharp_fraction x seed (optimizer from hydra.yaml)
    for num, (sf, seed, losses) in enumerate(
        [(0.1, 0, [0.9, 0.5]), (0.1, 1, [0.8, 0.6]), (0.2, 0, [0.7, 0.4]), (0.2, 1, [0.9, 0.3])]
    ):
        _job(
            a / str(num),
            ["optimizer=flat_sophia", f"seed={seed}", f"optimizer.sharp_fraction={sf}", "+x=1"],
            _csv(losses),
            seed,
            hydra_opt="flat_sophia",
        )
    # sweep b: sophia_h, no hydra.yaml: name from module.optimizer_name (seed 0) or optimizer._target_ (seed 1)
    _job(
        b / "0",
        ["optimizer=sophia_h", "seed=0", "+x=1"],
        _csv([0.6, 0.45]),
        0,
        module_name="sophia_h",
        target="flatsophia.optim.SophiaH",
    )
    _job(b / "1", ["optimizer=sophia_h", "seed=1", "+x=1"], _csv([0.6, 0.5]), 1, target="flatsophia.optim.SophiaH")
    s = summarize([a, b], out=tmp_path / "out", pair=("flat_sophia", "SophiaH"))
    assert s.common == {"x": "1"}
    assert sorted(zip(s.table["optimizer"], s.table["setting"])) == [
        ("SophiaH", ""),
        ("flat_sophia", "optimizer.sharp_fraction=0.1"),
        ("flat_sophia", "optimizer.sharp_fraction=0.2"),
        ("sophia_h", ""),
    ]
    r = _row(s.table, "flat_sophia", "optimizer.sharp_fraction=0.2")
    assert r["val_loss_best_mean"] == pytest.approx(0.35) and r["val_loss_best_std"] == pytest.approx(0.1 / 2**0.5)
    assert r["val_loss_best_step_mean"] == 19
    r = _row(s.table, "flat_sophia", "optimizer.sharp_fraction=0.1")
    assert r["val_loss_best_mean"] == pytest.approx(0.55)
    # one seed per sophia_h-named group: mean only, no std
    assert _row(s.table, "sophia_h")["n_seeds"] == 1
    assert "| sophia_h | - | 1 | 0.45 |" in s.markdown
    # pairs: every flat_sophia setting against SophiaH's only setting (seed 1 only)
    p = s.paired[s.paired["quantity"] == "best val/loss"].set_index("setting")
    assert p.loc["optimizer.sharp_fraction=0.1 vs -", "diffs"] == pytest.approx({1: 0.6 - 0.5})
    assert p.loc["optimizer.sharp_fraction=0.2 vs -", "diffs"] == pytest.approx({1: 0.3 - 0.5})
    assert p.loc["optimizer.sharp_fraction=0.2 vs -", "a_better"] == 1
    assert (tmp_path / "out" / "val_loss.png").stat().st_size > 0
    assert not (tmp_path / "out" / "val_acc.png").exists()  # no val/acc logged


def test_variants_several_pairs_and_final_test_scores(tmp_path):
    # Three variant labels (tuned settings differ between them, one setting each), test_final/* logged.
    def csv(losses, test, test_final):
        return _csv(losses, "test/loss,test_final/loss") + (
            f",{10 * len(losses)},,{test},{test_final}\n"
        )

    specs = {
        "flat_sophia": ("flat_sophia", ["optimizer.lr=0.0015784962692033842", "optimizer.sharp_fraction=0.2"]),
        "flat_sophia_random": ("flat_sophia", ["optimizer.lr=0.0015784962692033842", "optimizer.mask_source=random"]),
        "sophia_h": ("sophia_h", ["optimizer.lr=0.003"]),
    }
    losses = {"flat_sophia": [0.8, 0.5], "flat_sophia_random": [0.8, 0.7], "sophia_h": [0.9, 0.6]}
    for name, (opt, ovr) in specs.items():
        for seed in (0, 1):
            shift = 0.1 * seed
            _job(
                tmp_path / "runs" / name / str(seed),
                [f"optimizer={opt}", f"seed={seed}", f"variant={name}", *ovr],
                csv([v + shift for v in losses[name]], 0.4 + shift, losses[name][-1] + 0.05),
                seed,
                hydra_opt=opt,
                variant=name,
            )
    s = summarize(
        sorted((tmp_path / "runs").iterdir()),
        out=tmp_path / "out",
        pair=[("flat_sophia", "sophia_h"), "flat_sophia,flat_sophia_random"],
    )
    assert sorted(s.table["optimizer"]) == ["flat_sophia", "flat_sophia_random", "sophia_h"]
    settings = dict(zip(s.table["optimizer"], s.table["setting"]))
    assert settings["flat_sophia"] == "optimizer.lr=0.001578, optimizer.sharp_fraction=0.2"  # 4 significant digits
    assert "variant" not in settings["flat_sophia"]
    # one setting per label: no setting column in the Markdown
    assert "| flat_sophia | 2 |" in s.markdown and "| setting |" not in s.markdown
    assert set(s.paired_all) == {("flat_sophia", "sophia_h"), ("flat_sophia", "flat_sophia_random")}
    assert s.paired is s.paired_all[("flat_sophia", "sophia_h")]
    pr = s.paired_all[("flat_sophia", "flat_sophia_random")].set_index("quantity")
    assert pr.loc["final val/loss", "diffs"] == pytest.approx({0: -0.2, 1: -0.2})
    assert pr.loc["final test loss", "diffs"] == pytest.approx({0: 0.55 - 0.75, 1: 0.55 - 0.75})
    assert "## Paired differences flat_sophia - flat_sophia_random (same seed)" in s.markdown
    r = _row(s.table, "sophia_h", s.table.set_index("optimizer").at["sophia_h", "setting"])
    assert r["test_final_loss_mean"] == pytest.approx(0.65) and r["test_loss_mean"] == pytest.approx(0.45)
    assert "final test loss" in s.markdown


def test_time_sources_and_target_for_a_max_metric(tmp_path):
    # wall_time column: ms/step = span of wall_time / span of step; time to target from wall_time
    csv = "epoch,step,val/loss,val/acc,wall_time\n0,9,0.9,0.2,100.0\n1,19,0.7,0.5,102.0\n2,29,0.6,0.6,104.0\n"
    _job(tmp_path / "s" / "0", ["optimizer=adamw", "seed=0"], csv, 0, hydra_opt="adamw")
    # neither: file times (config written at job start, metrics.csv last written at the end)
    job = _job(tmp_path / "s" / "1", ["optimizer=sgd", "seed=0"], _csv([0.9, 0.8]), 0, hydra_opt="sgd")
    start = 1_700_000_000
    os.utime(job / ".hydra" / "config.yaml", (start, start))
    os.utime(job / "logs" / "csv" / "version_0" / "metrics.csv", (start + 38, start + 38))  # max step 19
    s = summarize(tmp_path / "s", metric="val/acc", target=0.5, write=False)
    runs = s.runs.set_index("optimizer")
    assert runs.loc["adamw", "time_source"] == "wall_time"
    assert runs.loc["adamw", "ms_per_step"] == pytest.approx(1000 * 4.0 / 20)
    assert runs.loc["adamw", "metric_best"] == 0.6 and runs.loc["adamw", "metric_best_step"] == 29  # max for acc
    assert runs.loc["adamw", "steps_to_target"] == 19  # first val/acc >= 0.5
    assert runs.loc["adamw", "time_to_target_s"] == pytest.approx(2.0)
    assert runs.loc["sgd", "time_source"] == "file mtimes"
    assert runs.loc["sgd", "ms_per_step"] == pytest.approx(1000 * 38 / 19)
    assert "steps to val/acc >= 0.5" in s.markdown and "best val/acc" in s.markdown
    assert not s.files


def test_cli(tmp_path, capsys, monkeypatch):
    write_demo_sweep(tmp_path / "sweep")
    argv = ["summarize.py", str(tmp_path / "sweep"), "--target", "0.75", "--pair", "flat_sophia,sophia_h"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "scripts" / "summarize.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "| adamw | 2 |" in printed and "wrote" in printed
    assert (tmp_path / "sweep" / "summary.md").is_file()  # default --out: the sweep folder
    assert (tmp_path / "sweep" / "val_loss.png").stat().st_size > 0


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No job folder"):
        summarize(tmp_path, write=False)
    write_demo_sweep(tmp_path / "sweep")
    with pytest.raises(ValueError, match="not in the sweep"):
        summarize(tmp_path / "sweep", pair="flat_sophia,sophia_g", write=False)


def test_val_loss_rise_measures_overfitting_after_the_best_point(demo):
    runs = demo.runs.set_index(["optimizer", "seed"])
    assert runs.loc[("adamw", 0), "val_loss_rise"] == pytest.approx(0.75 - 0.70)
    assert runs.loc[("adamw", 1), "val_loss_rise"] == pytest.approx(0.0)  # still falling at the end
    p = demo.paired.set_index("quantity")
    assert p.loc["val loss rise", "diffs"] == pytest.approx({0: 0.01 - 0.02, 1: 0.04 - 0.0})
    assert "val loss rise (final - best)" in demo.markdown
