"""The optimizer library installs and runs with torch alone; the template's stack is an extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

#: Top-level modules of the template's stack (the `template` extra and what it pulls in).
TEMPLATE_STACK = (
    "lightning", "pytorch_lightning", "lightning_utilities", "hydra", "omegaconf", "torchmetrics", "timm",
    "wandb", "torchvision", "rich", "mnist1d", "sklearn", "matplotlib", "pandas",
)


def test_core_dependencies_are_torch_only():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0].strip() for d in meta["dependencies"]] == ["torch"]
    template = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["optional-dependencies"]["template"]}
    assert {"lightning", "hydra-core", "omegaconf", "timm", "wandb", "torchmetrics"} <= template


def test_library_trains_without_importing_the_template_stack():
    """In a fresh interpreter, every registry optimizer and both estimators build and train (the loss
    goes down) without importing any package of the template's stack (none is in ``sys.modules``)."""
    code = textwrap.dedent(
        f"""
        import sys
        BLOCKED = {TEMPLATE_STACK!r}
        import torch
        from flatsophia.hessian import build_estimator
        from flatsophia.optim import OPTIMIZERS, create_optimizer

        for name, spec in OPTIMIZERS.items():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
            loss_fn = torch.nn.functional.cross_entropy
            opt = create_optimizer(model, name, lr=1e-2)
            est = build_estimator(spec.hessian, seed=0)
            first = loss_fn(model(x), y).item()
            for step in range(30):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if est is not None and step % 5 == 0:
                    est_params = opt.hessian_params()
                    opt.update_hessian(est(lambda: model(x), lambda out: loss_fn(out, y), est_params))
                opt.step(**({{"bs": 32}} if spec.hessian == "gnb" else {{}}))
            last = loss_fn(model(x), y).item()
            assert last < first, (name, first, last)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok", len(OPTIMIZERS))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"ok {5}"
