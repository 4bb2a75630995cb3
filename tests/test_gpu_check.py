"""`make gpu-check` (scripts/gpu_check.sh): the GPU acceptance run. Without a GPU it stops at once
with the reason; its training runs compose with `trainer=gpu` for every optimizer."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without CUDA shows")
def test_refuses_without_a_gpu():
    import sys

    logs = ROOT / "logs" / "gpu_check"
    before = sorted(logs.iterdir()) if logs.exists() else []
    out = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env={**os.environ, "PY": sys.executable}, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "gpu-check needs a CUDA GPU" in out.stderr
    assert (sorted(logs.iterdir()) if logs.exists() else []) == before, "nothing is written before the check"


def test_every_registry_optimizer_is_run_with_trainer_gpu(make_cfg):
    from flatsophia.optim.factory import OPTIMIZERS

    text = SCRIPT.read_text()
    bf16 = re.search(r"for opt in ([a-z_ ]+); do\n\s+echo \"-- \$opt, bf16-mixed\"", text).group(1).split()
    assert sorted(bf16) == sorted(OPTIMIZERS)
    for name in bf16:
        cfg = make_cfg(["trainer=gpu", "trainer.max_epochs=3", "logger=csv", f"optimizer={name}"])
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
