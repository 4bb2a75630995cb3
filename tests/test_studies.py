"""The claim-study driver (flatsophia.experiments.studies): planned commands, derived controls, task runner, report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from demo_sweep import DEMO_RUNS, write_demo_sweep
from flatsophia.experiments import studies
from flatsophia.experiments.studies import (
    STUDIES,
    Study,
    Task,
    Variant,
    plan_ablation,
    plan_runs,
    plan_tuning,
    report,
    run_tasks,
)

TUNED = {
    "adamw": {"optimizer.lr": 0.002},
    "sophia_h": {"optimizer.lr": 0.003, "optimizer.gamma": 0.02},
    "flat_sophia": {"optimizer.lr": 0.004, "optimizer.gamma": 0.03, "optimizer.sharp_fraction": 0.25},
    "soap": {"optimizer.lr": 0.001},
}


def _write_tuning(out: Path, tuned=TUNED) -> None:
    for opt, params in tuned.items():
        d = out / "tune" / opt
        d.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(
            OmegaConf.create({"name": "optuna", "best_params": params, "best_value": 1.0}),
            d / "optimization_results.yaml",
        )


def _arg(task: Task, key: str) -> str:
    values = [a.split("=", 1)[1] for a in task.argv if a.startswith(key + "=")]
    assert len(values) == 1, (key, task.argv)
    return values[0]


def test_tuning_gives_every_optimizer_the_same_budget(tmp_path):
    tasks = plan_tuning(STUDIES["overfit"], tmp_path, device="gpu", extra=["trainer.max_epochs=2"])
    assert [t.name for t in tasks] == ["tune/adamw", "tune/sophia_h", "tune/flat_sophia", "tune/soap"]
    for t, opt in zip(tasks, STUDIES["overfit"].optimizers):
        assert t.argv[:3] == [sys.executable, str(studies.project_root() / "src" / "train.py"), "-m"]
        assert _arg(t, "hparams_search") == f"qmc_{opt}"
        assert _arg(t, "hydra.sweeper.n_trials") == _arg(t, "hydra.launcher.n_jobs") == "5"
        assert _arg(t, "seed") == "1000"  # the tuning seed; report seeds are 0-4
        assert _arg(t, "trainer") == "gpu" and _arg(t, "trainer.precision") == "32-true"
        assert _arg(t, "trainer.max_epochs") == "2"
        assert _arg(t, "hydra.sweep.dir") == str(tmp_path / "tune" / opt)
        assert t.procs == 5
    with pytest.raises(ValueError, match=r"Invalid device: 'tpu' \(cpu \| gpu\)"):
        plan_tuning(STUDIES["overfit"], tmp_path, device="tpu")


def test_runs_use_the_tuned_settings_and_derive_the_controls(tmp_path):
    _write_tuning(tmp_path)
    tasks = {t.name: t for t in plan_runs(STUDIES["overfit"], tmp_path, jobs=4)}
    assert list(tasks) == [
        "adamw",
        "sophia_h",
        "flat_sophia",
        "soap",
        "flat_sophia_random",
        "sophia_h_matched",
        "flat_sophia_rademacher",
        "flat_sophia_probes4",
        "flat_sophia_ema",
    ]
    flat = tasks["flat_sophia"]
    assert _arg(flat, "optimizer") == "flat_sophia" and _arg(flat, "optimizer.lr") == "0.004"
    assert _arg(flat, "seed") == "0,1,2,3,4" and _arg(flat, "test_final") == "true"
    assert _arg(flat, "variant") == "flat_sophia" and flat.procs == 4
    assert _arg(tasks["flat_sophia_random"], "optimizer.mask_source") == "random"
    assert _arg(tasks["flat_sophia_random"], "optimizer.sharp_fraction") == "0.25"
    matched = tasks["sophia_h_matched"]
    assert _arg(matched, "optimizer") == "sophia_h"
    # mean step shrink of a 25% mask damped 10x: 0.75 + 0.25 / 10 = 0.775
    assert float(_arg(matched, "optimizer.lr")) == pytest.approx(0.004 * 0.775)
    assert _arg(matched, "optimizer.gamma") == "0.03"
    assert not any(a.startswith("optimizer.sharp_fraction") for a in matched.argv)
    assert _arg(tasks["flat_sophia_probes4"], "hessian.n_probes") == "4"
    assert _arg(tasks["flat_sophia_rademacher"], "hessian.distribution") == "rademacher"


def test_runs_of_chosen_variants_only(tmp_path):
    _write_tuning(tmp_path)
    tasks = plan_runs(STUDIES["overfit"], tmp_path, only=["sophia_h_matched", "adamw"])
    assert [t.name for t in tasks] == ["sophia_h_matched", "adamw"]
    with pytest.raises(ValueError, match=r"Unknown variant\(s\) \['nope'\]"):
        plan_runs(STUDIES["overfit"], tmp_path, only=["nope"])


def test_ablation_grid_replaces_the_tuned_grid_keys(tmp_path):
    _write_tuning(tmp_path)
    (task,) = plan_ablation(STUDIES["overfit"], tmp_path, jobs=6)
    assert _arg(task, "ablation") == "flat_sophia_mask" and _arg(task, "optimizer") == "flat_sophia"
    assert _arg(task, "optimizer.lr") == "0.004" and _arg(task, "seed") == "0,1"
    assert not any(a.startswith("optimizer.sharp_fraction=") for a in task.argv)  # swept by the grid
    assert task.procs == 6 and _arg(task, "hydra.launcher.n_jobs") == "6"
    assert not any(a.startswith("variant=") for a in task.argv)  # grid points differ by their settings
    assert plan_ablation(STUDIES["charlm"], tmp_path) == []


def test_runs_need_the_tuning_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the tune phase first"):
        plan_runs(STUDIES["charlm"], tmp_path)


def test_task_runner_bounds_parallelism_and_reports_failures(tmp_path):
    stamp = tmp_path / "stamps"
    stamp.mkdir()
    code = (
        "import os, sys, time, pathlib; d = pathlib.Path(sys.argv[1]); me = d / str(os.getpid()); me.touch(); "
        "n = len(list(d.iterdir())); time.sleep(0.3); me.unlink(); sys.exit(0 if n <= 2 else 3)"
    )
    tasks = [Task(f"t{i}", [sys.executable, "-c", code, str(stamp)], 1, tmp_path / f"t{i}.log") for i in range(4)]
    tasks.append(Task("bad", [sys.executable, "-c", "raise SystemExit(7)"], 1, tmp_path / "bad.log"))
    run_tasks(tasks, jobs=2)
    assert [t.returncode for t in tasks] == [0, 0, 0, 0, 7]  # never more than 2 at once
    assert all(t.seconds >= 0 for t in tasks)
    assert (tmp_path / "t0.log").read_text().startswith(sys.executable)


def test_report_tables_target_and_pairs(tmp_path):
    study = Study(
        experiment="flat_sophia_overfit",
        optimizers=("adamw", "sophia_h", "flat_sophia"),
        seeds=(0, 1),
        variants=(Variant("flat_sophia_random", "flat_sophia", extra=("optimizer.mask_source=random",)),),
        pairs=(("flat_sophia", "sophia_h"), ("flat_sophia", "flat_sophia_random"), ("flat_sophia", "missing")),
        target_rule=("best", "adamw"),
        trials=2,
    )
    _write_tuning(tmp_path, {k: TUNED[k] for k in study.optimizers})
    for opt in study.optimizers:  # two fake trials per optimizer; trial 1 has the tuned lr
        write_demo_sweep(tmp_path / "tune" / opt, {(opt, 1000): DEMO_RUNS[(opt, 0)], (opt, 1001): DEMO_RUNS[(opt, 1)]})
        overrides = tmp_path / "tune" / opt / "1" / ".hydra" / "overrides.yaml"
        overrides.write_text(overrides.read_text() + "".join(f"- {k}={v}\n" for k, v in TUNED[opt].items()))
    runs = dict(DEMO_RUNS)
    runs.update({("flat_sophia_random", s): DEMO_RUNS[("sophia_h", s)] for s in (0, 1)})
    for name in ("adamw", "sophia_h", "flat_sophia", "flat_sophia_random"):
        write_demo_sweep(tmp_path / "runs" / name, {k: v for k, v in runs.items() if k[0] == name})
    docs = tmp_path / "docs"
    path = report(study, tmp_path, docs=docs, name="overfit")
    md = path.read_text()
    assert md.startswith("# Study `overfit`")
    # target: adamw's mean best val loss over its seeds (0.70 and 0.74)
    assert "adamw's mean best val loss = 0.7200" in md
    assert "| 1 | optimizer.lr=0.004, optimizer.gamma=0.03, optimizer.sharp_fraction=0.25 | 0.7600 | **yes** |" in md
    assert "Compute: tuning 6 runs" in md and "seeded runs 8 runs" in md
    assert "## Paired differences flat_sophia - sophia_h (same seed)" in md
    assert "## Paired differences flat_sophia - flat_sophia_random (same seed)" in md
    assert "missing" not in md.split("## Results")[1]  # pairs with absent variants are left out
    assert "`optimizer.mask_source=random`" in md
    for name in ("report.md", "summary.md", "val_loss.png", "runs.csv"):
        assert (docs / name).is_file(), name


def test_cli_dry_run_prints_the_tuning_commands(capsys, tmp_path):
    assert studies.main(["charlm", "--dry-run", "--trials", "3", "--out", str(tmp_path), "trainer.max_steps=5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(
        "hydra.sweeper.n_trials=3" in line and "trainer.max_steps=5" in line for line in lines
    )
    with pytest.raises(SystemExit):
        studies.main(["charlm", "--jobs", "0"])


def test_project_root_found_from_the_checkout_and_refused_elsewhere(tmp_path, monkeypatch):
    """The studies find src/train.py from the working directory (no path baked into the package)."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.delenv("PROJECT_ROOT", raising=False)
    monkeypatch.chdir(root / "conf")
    assert studies.project_root() == root
    fake = tmp_path / "proj"
    (fake / "src").mkdir(parents=True)
    (fake / "conf").mkdir()
    (fake / "src" / "train.py").write_text("")
    (fake / "conf" / "train.yaml").write_text("")
    monkeypatch.setenv("PROJECT_ROOT", str(fake))
    assert studies.project_root() == fake
    installed = tmp_path / "site-packages" / "flatsophia" / "experiments" / "studies.py"
    monkeypatch.setattr(studies, "__file__", str(installed))
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="src/train.py"):
        studies.project_root()


def test_charlm_study_keeps_the_protocol_it_was_run_with(make_cfg):
    """docs/claims.md (2): weight decay 0.2 for every optimizer, each at its own default betas and rho,
    whatever per-optimizer values experiment=sophia_charlm now carries."""
    study = STUDIES["charlm"]
    for opt, betas in (("adamw", [0.9, 0.999]), ("sophia_g", [0.965, 0.99]), ("sophia_h", [0.965, 0.99])):
        cfg = make_cfg([f"experiment={study.experiment}", *study.overrides, f"optimizer={opt}"], tiny=False)
        assert (cfg.optimizer.weight_decay, list(cfg.optimizer.betas), cfg.settings_source) == (0.2, betas, None)
    cfg = make_cfg([f"experiment={study.experiment}", *study.overrides, "optimizer=sophia_g"], tiny=False)
    assert cfg.optimizer.rho == 0.04  # the library default the study tuned from, not the paper's 0.05
