"""The cluster launch pieces: scripts/slurm_train.sbatch's command composes, callbacks=step_checkpoints keeps
the newest step checkpoints and a last.ckpt that follows the run."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import ROOT, compose_config
from flatsophia.training import train


def _srun_overrides(env: dict[str, str]) -> list[str]:
    text = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    command = re.search(r"^srun .*?src/train\.py(.*?)\"\$@\"", text, flags=re.M | re.S).group(1)
    for name, value in env.items():  # the shell's ${VAR} and ${VAR:-default}
        command = re.sub(r"\$\{" + name + r"(:-[^}]*)?\}", value, command)
    return shlex.split(command.replace("\\\n", " "))


def test_sbatch_command_composes_into_a_requeueable_ddp_run(tmp_path, data_dir):
    env = {"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_JOB_ID": "777"}
    overrides = _srun_overrides(env)
    assert "hydra.run.dir=logs/train/runs/slurm_777" in overrides
    cfg = compose_config("train", [o for o in overrides if not o.startswith("hydra.")], tmp_path, data_dir)
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == ("ddp", 8, 2)
    callbacks = {name: hydra.utils.instantiate(c) for name, c in cfg.callbacks.items() if c}
    assert type(callbacks["slurm_requeue"]).__name__ == "SlurmRequeue"
    text = (ROOT / "scripts" / "slurm_train.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in text and callbacks["slurm_requeue"].signum.name == "SIGUSR1"


def test_step_checkpoints_keep_the_newest(make_cfg):
    cfg = make_cfg(
        [
            "callbacks=step_checkpoints",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.lr_monitor=null",
            "callbacks.step_checkpoint.every_n_train_steps=2",
            "callbacks.step_checkpoint.save_top_k=2",
            "trainer.max_epochs=3",  # 3 optimizer steps per epoch: 9 steps
        ]
    )
    _, objects = train(cfg)
    folder = Path(cfg.paths.output_dir) / "checkpoints"
    steps = sorted(p.name for p in folder.glob("step_*.ckpt"))
    assert steps == ["step_0000006.ckpt", "step_0000008.ckpt"]
    for name in steps:
        assert torch.load(folder / name, weights_only=True)["global_step"] == int(name[5:12])
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9  # rewritten at the step checkpoints and at the epochs' ends
    assert any(isinstance(c, ModelCheckpoint) and c.monitor == "val/loss" for c in objects["callbacks"])


def test_requeue_signal_is_checked():
    from flatsophia.callbacks import SlurmRequeue

    assert SlurmRequeue(signal="USR2").signum.name == "SIGUSR2"
    with pytest.raises(ValueError, match="Invalid signal: 'USR9'"):
        SlurmRequeue(signal="USR9")
    with pytest.raises(ValueError, match="Invalid requeue: 'yes'"):
        SlurmRequeue(requeue="yes")
    with pytest.raises(ValueError, match="Invalid sigterm: 1"):
        SlurmRequeue(sigterm=1)


def test_run_ids_are_fixed_per_job_and_folder(monkeypatch):
    from flatsophia.utils.resolvers import slurm_run_id

    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_run_id("logs/a") is None  # outside SLURM: Lightning's next version / a new W&B run
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    first = slurm_run_id("logs/a")
    assert first.startswith("123-") and first == slurm_run_id("logs/a")  # the requeued job: the same id
    assert slurm_run_id("logs/b") != first  # another run of the allocation: its own table and W&B run
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_run_id("logs/a").startswith("120_3-")


def test_submitit_slurm_launcher_composes_into_an_sbatch_file(tmp_path, data_dir, monkeypatch):
    """``hydra/launcher=submitit_slurm``: submitit takes every key (as the launcher passes them), and the job
    asks SLURM for submitit's signal before the time limit (the slurm_requeue callback handles it)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    cfg = compose_config("train", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], tmp_path, data_dir)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    assert params.pop("submitit_folder").endswith("/.submitit/%j") and params["max_num_timeout"] > 0
    # As SlurmLauncher.launch does, without submitting (a fake srun: the executor looks for one)
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(
        folder=tmp_path, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit", "x")
    assert "#SBATCH --signal=USR2@120" in sbatch and "#SBATCH --partition=gpu" in sbatch
    assert "#SBATCH --time=240" in sbatch


@pytest.mark.parametrize("requeue_signal", ["USR1", "USR2"])
def test_submitit_jobs_hand_submitits_signal_back_to_its_handler(monkeypatch, requeue_signal):
    """In a submitit job on SLURM the callback takes submitit's SIGUSR2 (also when it is the requeue signal),
    keeps submitit's handler to call after saving, and gives every handler back at teardown."""
    import signal
    from types import SimpleNamespace

    from flatsophia.callbacks import SlurmRequeue

    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)

    def submitits(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR2, submitits)
    try:
        callback = SlurmRequeue(signal=requeue_signal)
        trainer = SimpleNamespace(is_global_zero=True, default_root_dir="logs/x")
        callback.setup(trainer, None, "fit")
        assert callback._submitit == (signal.SIGUSR2, submitits)
        assert signal.getsignal(signal.SIGUSR2) == callback._handler
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR2) is submitits
    finally:
        signal.signal(signal.SIGUSR2, before)
