"""``-m`` sweeps through the command line (src/train.py), as lightning-hydra-template's test_sweeps.py.

Each test is one ``python src/train.py -m ...`` process (about 5 s of imports) with tiny runs: over the
learning rate with simulated DDP and two loggers, over every experiment that this machine can run,
and with the Optuna sweeper.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import yaml

from conftest import TINY_DEFAULT, run_script
from flatsophia.validation import validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

#: The default data and model made tiny, two training batches, one validation batch.
SHORT = [
    *TINY_DEFAULT,
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "++trainer.limit_train_batches=2",
    "++trainer.limit_val_batches=1",
    "++trainer.limit_test_batches=1",
    "scheduler.warmup_steps=1",
    "callbacks=none",
]


def sweep(tmp_path: Path, data_dir: Path, *overrides: str) -> tuple[str, list[Path]]:
    """Run ``src/train.py -m <overrides>``; return its stdout and the job folders of the one sweep folder."""
    offline = {"WANDB_MODE": "offline", "WANDB_API_KEY": None}
    result = run_script("train", "-m", *overrides, log_dir=tmp_path, data_dir=data_dir, timeout=600, **offline)
    (folder,) = [p for p in tmp_path.glob("*/multiruns/*") if p.is_dir()]
    return result.stdout, sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow
def test_sweep_over_lr_with_ddp_sim_and_two_loggers(tmp_path, data_dir):
    """Two jobs, each 2 ranks (ddp_spawn) logging to CSV and W&B: each job its own table and W&B run."""
    out, jobs = sweep(
        tmp_path, data_dir, "optimizer.lr=0.001,0.003", "trainer=ddp_sim", "logger=many_loggers", "test=false", *SHORT
    )
    assert [j.name for j in jobs] == ["0", "1"] and out.count("Final metrics:") == 2
    for job, lr in zip(jobs, ("0.001", "0.003")):
        assert f"optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        (table,) = job.glob("csv/version_*/metrics.csv")
        assert "val/loss" in table.read_text().splitlines()[0]
        assert len(list(job.glob("wandb/offline-run-*"))) == 1


def runnable_experiments(make_cfg) -> tuple[list[str], dict[str, str]]:
    """Experiments that can run here as a CPU fast_dev_run, and why each other one cannot."""
    ok, why = [], {}
    for name in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        cfg = make_cfg([f"experiment={name}", "debug=fast_dev_run"], tiny=False)
        try:
            validate_config(cfg)
            hydra.utils.instantiate(cfg.data).check_available()
            ok.append(name)
        except FileNotFoundError as err:  # needs a download (tests/test_compose.py checks the message)
            why[name] = str(err)
    return ok, why


@pytest.mark.slow
def test_sweep_over_experiments(tmp_path, data_dir, make_cfg):
    """``experiment=glob(*)`` as in template projects, leaving out experiments whose data need a download."""
    ok, why = runnable_experiments(make_cfg)
    assert ok, why
    chosen = f"experiment=glob(*,exclude=[{','.join(why)}])" if why else "experiment=glob(*)"
    out, jobs = sweep(tmp_path, data_dir, chosen, "debug=fast_dev_run")
    assert len(jobs) == len(ok) and out.count("Final metrics:") == len(ok)
    ran = sorted(yaml.safe_load((j / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]["choices"]["experiment"]
                 for j in jobs)
    assert ran == ok


@pytest.mark.slow
def test_optuna_sweep(tmp_path, data_dir):
    out, jobs = sweep(
        tmp_path,
        data_dir,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=none",
        *SHORT,
    )
    assert len(jobs) == 2
    (results,) = tmp_path.glob("*/multiruns/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())
    assert set(best["best_params"]) == {"optimizer.lr"} and best["best_value"] > 0
