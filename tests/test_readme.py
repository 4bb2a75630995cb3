"""The README's first two commands are `make train` and `make test`; the Makefile and .ci/run agree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)]


def make_targets(text: str) -> set[str]:
    return set(re.findall(r"^([A-Za-z_][\w.-]*)\s*:(?!=)", text, flags=re.M))


def recipe(text: str, target: str) -> str:
    match = re.search(rf"^{re.escape(target)}\s*:[^\n]*\n((?:\t[^\n]*\n?)*)", text, flags=re.M)
    assert match, f"no recipe for {target}"
    return match.group(1)


def test_readme_starts_with_make_train_and_make_test():
    text = (ROOT / "README.md").read_text()
    blocks = fenced_blocks(text)
    assert blocks[:2] == ["make train", "make test"]
    before = text[: text.index("make test")]
    assert before.count("```") == 3, "nothing but the two fenced commands comes first"


def test_makefile_targets():
    text = (ROOT / "Makefile").read_text()
    assert {"train", "test", "install", "bench", "lint"} <= make_targets(text)
    install = recipe(text, "$(VENV)/.installed")
    assert "python3 -m venv" in install
    assert "$(PIP) install $(TORCH_PINS)" in install and "TORCH_PINS := torch==2.14.1 torchvision==0.29.1" in text
    assert '$(PIP) install -e ".[test]"' in install
    assert "src/train.py" in recipe(text, "train")
    assert "-m pytest" in recipe(text, "test")


def test_ci_runs_the_readme_test_command_after_the_makefile_install():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert "python3 -m venv" in ci
    assert 'pip" install torch==2.14.1 torchvision==0.29.1' in ci
    assert 'pip" install -e ".[test]"' in ci
    assert re.search(r"^make test\b", ci, flags=re.M), ".ci/run must run the README's `make test`"
    assert "5" in ci  # pytest's "no tests collected"
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"
