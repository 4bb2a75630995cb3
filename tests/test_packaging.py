"""The optimizer library installs and runs with torch alone; the template's stack is an extra."""

from __future__ import annotations

import ast
import email
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

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


def _source_version() -> str:
    """``flatsophia.__version__`` as written in the sources (the one place the version lives)."""
    tree = ast.parse((ROOT / "src" / "flatsophia" / "__init__.py").read_text())
    (value,) = [n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "__version__"]
    return value


def test_one_version_the_packages_and_the_changelog_agree_on():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flatsophia.__version__"}
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert headings and headings[0] == _source_version(), "CHANGELOG.md's first entry is the current version"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built (``pip wheel``, the project's build backend) from a copy of the checkout's packaging
    inputs, tests and configs included, so that the checkout stays clean."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("src", "tests", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    out = subprocess.run([*pip, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    (path,) = (tmp / "dist").glob("flatsophia-*.whl")
    return path


def test_the_wheel_holds_the_package_and_requires_torch_only(wheel):
    version = _source_version()
    assert wheel.name == f"flatsophia-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(f"flatsophia-{version}.dist-info/METADATA"))
    assert {n.split("/")[0] for n in names} == {"flatsophia", f"flatsophia-{version}.dist-info"}  # no tests, conf
    for module in ("optim/flat_sophia.py", "hessian/refresh.py", "sharding.py", "checks.py", "bench/__main__.py"):
        assert f"flatsophia/{module}" in names, module
    assert meta["Version"] == version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r] == project["dependencies"]
    assert project["dependencies"][0].startswith("torch>=") and len(project["dependencies"]) == 1
    assert meta["Requires-Python"] == project["requires-python"]


def test_the_wheel_installs_next_to_torch_alone(wheel, tmp_path):
    """Installed with ``--no-deps`` into a folder of its own, the wheel imports and builds every registry
    optimizer with this interpreter's torch, from that folder, and reports its version."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site)]
    out = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    code = textwrap.dedent(
        """
        import importlib.metadata, torch, flatsophia
        from flatsophia.optim import OPTIMIZERS, create_optimizer
        opts = [create_optimizer(torch.nn.Linear(2, 2), name, lr=1e-3) for name in OPTIMIZERS]
        print(flatsophia.__file__, importlib.metadata.version("flatsophia"), len(opts))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    file, version, n = run.stdout.split()
    assert Path(file).is_relative_to(site) and version == _source_version() and int(n) == 5

