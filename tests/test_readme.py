"""The README's first two commands are `make train` and `make test`, and .ci/run and the conda
environment (environment.yaml) install what they do.

The Makefile is checked through `make -n` (its own parser prints the commands it would run), not by
reading its text.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)]


def make_dry_run(*args: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed on this machine")
    # Not a sub-make of `make test` (whose MAKEFLAGS/MAKELEVEL would add "Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    cmd = ["make", "--no-print-directory", "-n", "-B", "ARGS=", *args]  # no ARGS of an outer make
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def test_readme_starts_with_make_train_and_make_test():
    text = (ROOT / "README.md").read_text()
    assert fenced_blocks(text)[:2] == ["make train", "make test"]
    before = text[: text.index("make test")]
    assert before.count("```") == 3, "nothing but the two fenced commands comes first"


def test_make_train_and_test_run_the_entry_points_after_installing():
    train = make_dry_run("train", "VENV=/nonexistent/venv")
    assert any("python3 -m venv /nonexistent/venv" in c for c in train)
    assert train[-1] == "/nonexistent/venv/bin/python src/train.py"
    test = make_dry_run("test", "VENV=/nonexistent/venv")
    assert any(c.startswith("/nonexistent/venv/bin/python -m pytest -n 2") for c in test)


def test_ci_installs_exactly_what_make_install_does_then_runs_make_test():
    make_installs = make_install_args()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_installs = [m.group(1) for m in re.finditer(r'"\$VENV/bin/pip" (install .*)$', ci, flags=re.M)]
    assert make_installs == ci_installs
    assert make_installs[0] == "install torch==2.14.1 torchvision==0.29.1"
    assert re.search(r"^make test\b", ci, flags=re.M), ".ci/run must run the README's `make test`"
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def make_install_args() -> list[str]:
    """The arguments of each ``pip install`` that ``make install`` runs, in order."""
    return [c.split("/bin/pip ", 1)[1] for c in make_dry_run("install", "VENV=.venv") if "/bin/pip install" in c]


def test_conda_environment_installs_what_make_install_does():
    import tomllib

    import yaml
    from packaging.specifiers import SpecifierSet

    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    deps = env["dependencies"]
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    # conda hands its pip list to one `pip install -r`: the same requirements as make's installs together
    make_reqs = [tok for args in make_install_args() for tok in shlex.split(args)[1:]]
    conda_reqs = [tok for line in pip for tok in shlex.split(line)]
    assert conda_reqs == make_reqs
    assert "pip" in deps

    python = [d.split("=", 1)[1] for d in deps if isinstance(d, str) and d.startswith("python=")]
    assert len(python) == 1, "environment.yaml pins one Python version"
    allowed = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert allowed.contains(python[0] + ".0"), f"python={python[0]} is outside requires-python {allowed}"
    if os.environ.get("CI"):  # CI builds .venv from the machine's python3: the conda pin must be that version
        assert python[0] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_ci_runs_the_library_tests_on_the_oldest_torch_pyproject_allows():
    """`make test-lib`: a second environment with the torch that pyproject's floor names and flatsophia
    without the template's extras, running the library's tests; .ci/run runs it after `make test`."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    cmds = make_dry_run("test-lib", "LIB_VENV=/nonexistent/lib")
    installs = [c.split("/bin/pip ", 1)[1] for c in cmds if c.startswith("/nonexistent/lib/bin/pip install")]
    assert installs[1:] == ['install -e ".[test-lib]"']
    (torch_pin,) = re.fullmatch(r"install torch==([\d.]+)", installs[0]).groups()
    (floor,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = Requirement(floor).specifier
    assert Requirement(floor).name == "torch" and spec.operator == ">=" and Version(spec.version) == Version(torch_pin)
    assert cmds[-1].startswith("/nonexistent/lib/bin/python -m pytest --library")
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("\nmake test-lib") > ci.index("\nmake test ")
