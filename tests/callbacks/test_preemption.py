"""Simulated SLURM preemption: SIGUSR1 mid-run -> hpc checkpoint + `scontrol requeue`; the requeued job
(the same command) ends bit-identical to a run never stopped.

`python src/train.py` runs as a subprocess with SLURM's environment variables set, a fake `scontrol`
on PATH that records its arguments, and a test callback (tests/_signal_at.py) that sends SIGUSR1
after optimizer step 4. Sophia-H with a Hutchinson refresh every 2 steps, GPT with dropout, 2
micro-batches per optimizer step, 3 epochs of 3 steps: the signal lands mid accumulation-window
handling, the checkpoint mid-epoch.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, compose_config, run_script, script_command
from flatsophia.callbacks import Terminated
from flatsophia.training import train

TESTS = Path(__file__).resolve().parents[1]

RUN = [
    *[o for o in TINY if not o.startswith(("logger=", "++trainer.limit_val_batches"))],
    "logger=csv",
    "data.block_size=16",
    "data.batch_size=4",
    "model=gpt",
    "model.n_layer=1",
    "model.n_embd=16",
    "model.n_head=2",
    "model.dropout=0.1",
    "optimizer=sophia_h",
    "optimizer.lr=3e-3",
    "optimizer.gamma=1.0",  # a quarter to a third of the coordinates unclipped (optim/win_rate)
    "hessian.every_k=2",
    "module.accumulate=2",
    "module.grad_clip=null",
    "module.log_stats_every=1",
    "++trainer.limit_train_batches=6",
    "++trainer.limit_val_batches=1",
    "trainer.max_epochs=3",
    "trainer.log_every_n_steps=1",
    "test=false",
    "+callbacks.requeue._target_=flatsophia.callbacks.SlurmRequeue",
    "+callbacks.throughput._target_=flatsophia.callbacks.LMThroughput",
    "+callbacks.last._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.last.dirpath=${paths.output_dir}/checkpoints",
    "+callbacks.last.filename=last",
    "+callbacks.last.save_top_k=1",
    "+callbacks.last.enable_version_counter=false",
]

SIGNAL = ["+callbacks.signal._target_=_signal_at.SignalAt", "+callbacks.signal.step=4"]


def _slurm_env(tmp_path: Path, job: str, rank: int = 0, world: int = 1) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/scontrol.calls"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "SLURM_JOB_ID": job,
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": str(world),
        "SLURM_NTASKS_PER_NODE": str(world),
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }


def _run(tmp_path, data_dir, job, *extra, world=1):
    """One job: ``world`` tasks started as srun would (SLURM_PROCID 0..world-1), each ``src/train.py``."""
    run_dir = run_dir_of(tmp_path, job)
    overrides = [*RUN, *extra, f"hydra.run.dir={run_dir}"]
    if world == 1:
        result = run_script(
            "train", *overrides, log_dir=tmp_path / "logs", data_dir=data_dir, **_slurm_env(tmp_path, job)
        )
        return result.stdout + result.stderr, run_dir
    overrides += ["++trainer.strategy=ddp", f"trainer.devices={world}"]
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**_slurm_env(tmp_path, job, rank, world), "MASTER_PORT": str(port)}
        cmd, env = script_command("train", *overrides, log_dir=tmp_path / "logs", data_dir=data_dir, **env)
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return "".join(outputs), run_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    (table,) = run_dir.glob("csv/*/metrics.csv")  # one table: the requeued job appends to the first job's
    keep = (
        "epoch",
        "tokens",
        "val/tokens",
        "train/loss_step",
        "train/grad_norm",
        "optim/win_rate",
        "optim/hessian_refreshes",
        "val/loss",
    )
    rows = [{k: r.get(k, "") for k in keep} for r in csv.DictReader(open(table))]
    # Lightning repeats an optimizer step's values at the next micro-batch; a resumed job has no such repeat
    return [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]


#: The data: the charlm corpus (epochs of shuffled sequences), or token files (data=tokens: random
#: windows keyed by the batch index, which the checkpoint carries).
CHARLM = ["data=charlm", "data.max_chars=20000"]


def _tokens(token_files: Path) -> list[str]:
    return [
        "data=tokens",
        f"data.data_dir={token_files.parent}",
        "data.dataset=bytes",
        "data.num_classes=256",
        "data.eval_batch_size=2",
        "data.eval_iters=1",
        "data.num_workers=0",
    ]


@pytest.mark.parametrize("world,data", [(1, "charlm"), (2, "charlm"), (1, "tokens")])
def test_requeued_job_resumes_bit_exactly(tmp_path, data_dir, world, data, request):
    """``world=2``: two DDP ranks (gloo); only rank 0 gets the signal, both save and stop at the same step."""
    data = CHARLM if data == "charlm" else _tokens(request.getfixturevalue("token_files"))
    _, straight_dir = _run(tmp_path / "a", data_dir, "1001", *data, world=world)

    _run(tmp_path / "b", data_dir, "2002", *data, *SIGNAL, world=world)
    assert (tmp_path / "b" / "scontrol.calls").read_text().split() == ["requeue", "2002"]  # rank 0, once
    (hpc,) = run_dir_of(tmp_path / "b", "2002").glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, weights_only=True)
    # The signal came after step 4 (an accumulation window's first micro-batch followed): saved after step 5.
    assert saved["global_step"] == 5 and saved["epoch"] == 1
    assert saved["flatsophia"]["micro"] == 0 and saved["flatsophia"]["refresher"]["refreshes"] >= 2

    second, run_dir = _run(tmp_path / "b", data_dir, "2002", *data, *SIGNAL, world=world)  # the requeued job
    assert "resuming the requeued job from" in second

    a = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "schedule")
    _assert_same(a["flatsophia"]["refresher"], b["flatsophia"]["refresher"], "refresher")
    rows = _rows(straight_dir)
    win = [float(r["optim/win_rate"]) for r in rows if r["optim/win_rate"]]
    assert len(win) == 9 and 0.1 < min(win) and max(win) < 0.9  # many coordinates unclipped, some clipped
    validated = [r for r in rows if r["val/loss"]]
    per_step = 2 * 4 * 16 * world  # micro-batches x sequences x tokens x ranks
    assert [float(r["val/tokens"]) for r in validated] == [k * 3 * per_step for k in (1, 2, 3)]  # 3 steps/epoch
    assert rows == _rows(run_dir)  # the same metrics, in one table


def run_dir_of(tmp_path: Path, job: str) -> Path:
    return tmp_path / "runs" / f"slurm_{job}"


def _assert_same(x, y, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_same(x[k], y[k], f"{where}/{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_same(u, v, f"{where}/{i}")
    else:
        assert x == y, (where, x, y)


def test_sigterm_saves_at_a_step_boundary_and_the_rerun_resumes_bit_exactly(tmp_path, data_dir, monkeypatch):
    """No scheduler (Kubernetes, a spot instance): SIGTERM after step 4 -> hpc checkpoint after step 5, exit
    status 143; the same command in the same folder (here without the signal) resumes from it. In this
    process: Lightning's SIGTERM handler is replaced while training, and restored after."""
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(name)
    monkeypatch.syspath_prepend(str(TESTS))
    run = [o for o in RUN if o != "logger=csv"] + ["logger=none", *CHARLM]

    def fit(folder: Path, *extra: str) -> Path:
        _, objects = train(compose_config("train", [*run, *extra], folder, data_dir))
        return objects["trainer"].ckpt_path

    assert fit(tmp_path / "a") is None
    with pytest.raises(Terminated) as stopped:
        fit(tmp_path / "b", *SIGNAL, "+callbacks.signal.signal_name=SIGTERM")
    assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    (hpc,) = (tmp_path / "b").glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, weights_only=True)
    assert saved["global_step"] == 5 and saved["flatsophia"]["micro"] == 0  # after the step, not inside it
    assert fit(tmp_path / "b") == str(hpc)  # the same command, resumed

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    _assert_same(a["state_dict"], b["state_dict"], "weights")
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "schedule")
    _assert_same(a["flatsophia"]["refresher"], b["flatsophia"]["refresher"], "refresher")


def test_submitit_resubmission_resumes_bit_exactly(tmp_path, data_dir):
    """``hydra/launcher=submitit_local`` (submitit's local executor, as submitit_slurm without a cluster): the
    job gets submitit's signal (SIGUSR2) after step 4; the callback saves after step 5 and hands over to
    submitit's handler, which resubmits the task (the launcher's ``checkpoint()``); the restarted task
    resumes in the same job folder and ends bit-identical to a run never stopped."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {name: None for name in os.environ if name.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    run = [o for o in RUN if o != "logger=csv"] + ["logger=none", *CHARLM]
    logs = {"log_dir": tmp_path / "logs", "data_dir": data_dir}
    run_script("train", *run, f"hydra.run.dir={tmp_path / 'a'}", **logs, **env)
    sweep = tmp_path / "b"
    submit = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}"]
    run_script("train", "-m", *run, *SIGNAL, "+callbacks.signal.signal_name=SIGUSR2", *submit, **logs, **env)

    job = sweep / "0"
    log = (job / "train.log").read_text()
    assert log.count("Starting training") == 2 and f"Resuming the interrupted run from {job}/hpc_ckpt_1.ckpt" in log
    submitit_log = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Calling checkpoint method" in submitit_log and "Requeued job" in submitit_log
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 9
    _assert_same(a["state_dict"], b["state_dict"], "weights")
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer")
    _assert_same(a["flatsophia"]["refresher"], b["flatsophia"]["refresher"], "refresher")
