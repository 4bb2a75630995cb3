"""Committed results say how to reproduce them on any checkout: commands and paths relative to the
project root (``python -m flatsophia.bench --json docs/...``), never the folders of the machine that
ran them; and the tools that write results record them that way."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flatsophia.bench.cli import recorded_command
from flatsophia.commandline import shown_command, shown_path
from flatsophia.experiments import studies
from flatsophia.experiments.summarize import summarize

ROOT = Path(__file__).resolve().parents[1]

#: An absolute path in running text: a "/" that starts a word (after a space, quote, "=", "(" or "["),
#: followed by a folder name and another "/" (so "a/b", "~/x" and URLs do not count).
ABSOLUTE = re.compile(r"""(?:^|[\s"'`=(\[,])(/[\w.-]+/[\w./-]*)""", flags=re.M)
TEXT = {".md", ".json", ".txt", ".csv", ".py", ".yaml", ".ipynb"}


def committed_docs() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "docs", "README.md"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        files = [ROOT / f for f in out.stdout.splitlines()]
    else:  # not a git checkout (e.g. an unpacked archive): everything under docs/
        files = [ROOT / "README.md", *(p for p in (ROOT / "docs").rglob("*") if p.is_file())]
    return [f for f in files if f.suffix in TEXT and f.is_file()]


def test_committed_docs_and_results_hold_no_machine_paths():
    files = committed_docs()
    assert any(f.name == "cpu.json" for f in files) and any(f.name == "commands.txt" for f in files)
    found = {
        f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}": m.group(1)
        for f in files
        for text in [f.read_text(errors="replace")]
        for m in ABSOLUTE.finditer(text)
    }
    assert not found, f"absolute paths (write them relative to the project root): {found}"


def test_the_pattern_finds_the_paths_runs_used_to_record():
    for line in (
        "Command: `/work/main/.venv/bin/python -m flatsophia.bench --json /tmp/cpu.json`",
        '"command": "python scripts/benchmark.py --json /root/out/bench.json"',
        "adamw,lr=0.004,0,/home/me/logs/claims/charlm/runs/adamw/0,1.31",
        "  extras.print_config=false hydra.sweep.dir=/work/study_logs/default_seeds",
    ):
        assert ABSOLUTE.search(line), line
    for line in (
        "python -m flatsophia.bench --json docs/results/bench/cpu.json",
        "logs/train/runs/<run>/x",
        "see https://example.org/a/b",
        "~/data/x and a/b",
    ):
        assert not ABSOLUTE.search(line), line


def test_shown_command_is_what_to_type_in_the_checkout(tmp_path):
    argv = [
        "/opt/envs/proj/.venv/bin/python3.11",
        str(tmp_path / "src" / "train.py"),
        "-m",
        f"hydra.sweep.dir={tmp_path / 'logs' / 'tune'}",
        "optimizer.lr=0.001",
        "~callbacks.progress_bar",
        "--json",
        str(tmp_path / "docs" / "cpu.json"),
        "--out",
        "/elsewhere/out",  # outside the checkout: kept as given
    ]
    shown = shown_command(argv, tmp_path)
    assert shown.startswith(
        "python src/train.py -m hydra.sweep.dir=logs/tune optimizer.lr=0.001 '~callbacks.progress_bar' "
    )
    assert " --json docs/cpu.json --out /elsewhere/out" in shown
    assert str(tmp_path) not in shown
    assert shown_path(tmp_path, tmp_path) == "." and shown_path("logs/x", tmp_path) == "logs/x"


def test_the_benchmark_records_its_command_relative_to_the_checkout(monkeypatch):
    monkeypatch.chdir(ROOT)
    out = ROOT / "docs" / "results" / "bench" / "cpu.json"
    monkeypatch.setattr(
        sys, "orig_argv", [sys.executable, "-m", "flatsophia.bench", "--threads", "2", "--json", str(out)]
    )
    assert recorded_command(None) == "python -m flatsophia.bench --threads 2 --json docs/results/bench/cpu.json"
    assert recorded_command(["--smoke"]) == "python -m flatsophia.bench --smoke"


def test_claim_studies_list_commands_relative_to_the_checkout(monkeypatch):
    monkeypatch.delenv("PROJECT_ROOT", raising=False)
    monkeypatch.chdir(ROOT)
    out = (ROOT / "logs" / "claims" / "charlm").resolve()
    tasks = studies.plan_tuning(studies.STUDIES["charlm"], out)
    assert tasks and all(t.shell().startswith("python src/train.py -m ") for t in tasks)
    assert all(f"hydra.sweep.dir=logs/claims/charlm/tune/{t.name.split('/')[1]}" in t.shell() for t in tasks)
    assert not any(str(ROOT) in t.shell() for t in tasks)
    assert all(t.argv[0] == sys.executable for t in tasks)  # what runs: this interpreter


def test_summaries_name_the_runs_relative_to_the_working_directory(tmp_path, monkeypatch):
    from test_summarize import write_demo_sweep

    write_demo_sweep(tmp_path / "logs" / "sweep")
    monkeypatch.chdir(tmp_path)
    s = summarize(tmp_path / "logs" / "sweep", write=False)
    assert s.markdown.startswith("# Sweep summary: logs/sweep\n")
    assert s.runs["job"].str.startswith("logs/sweep/").all(), list(s.runs["job"])


@pytest.mark.parametrize("name", ["cpu.json", "cpu_iteration_rerun.json"])
def test_committed_benchmark_commands_write_where_the_result_lies(name):
    """Rerunning a committed result's command overwrites that very file."""
    import json

    path = ROOT / "docs" / "results" / "bench" / name
    command = json.loads(path.read_text())["meta"]["command"]
    assert command.startswith("python -m flatsophia.bench ") and command.endswith(f"--json {path.relative_to(ROOT)}")
