"""``python -m flatsophia.bench`` (or ``scripts/benchmark.py``, ``make bench``): run the sections, print
the Markdown report, write everything to ``--json``.

Usage::

    python -m flatsophia.bench --threads 2 --compile --json docs/results/bench/cpu.json
    python -m flatsophia.bench --smoke                      # tiny model, seconds (the tests)
    python -m flatsophia.bench --device cuda --compile --json docs/results/bench/cuda.json
    python -m flatsophia.bench --sections iteration --optimizers sophia_h --rounds 24

``main(argv)`` returns the results (the dict ``--json`` writes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from flatsophia.commandline import shown_command

from .report import markdown
from .sections import SECTIONS, Context
from .workloads import MODELS, REFERENCE, build_workload, optimizer_names

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = optimizer_names()
    p = argparse.ArgumentParser(
        prog="python -m flatsophia.bench",
        description="Benchmark the optimizers as users run them: training iteration, Hessian refresh, "
        "step, state, memory (see docs/performance.md).",
    )
    p.add_argument("--model", default="vit", help=f"{', '.join(MODELS)} or experiment=<name> (default vit)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the model's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --smoke: 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 12; --smoke 2)")
    p.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds per candidate and round for the step and refresh sections (default 1; --smoke 0.01)",
    )
    p.add_argument("--k", type=int, default=10, help="iterations per Hessian refresh (default 10)")
    p.add_argument(
        "--batch-fractions",
        default="1",
        help="comma-separated refresh batch fractions f in (0, 1]: second-order rows for each f < 1 estimate "
        "on the first ceil(f * B) examples (default 1: the whole batch only)",
    )
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument(
        "--optimizers",
        default=",".join(names),
        help=f"comma-separated subset of {','.join(names)} ({REFERENCE}, the reference, is always run)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile(opt.step)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 rounds, 1 thread, no compile: seconds")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every section)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.compile = "smoke", False
    if a.model not in MODELS and not a.model.startswith("experiment="):
        p.error(f"invalid --model {a.model!r} (expected {', '.join(MODELS)} or experiment=<name>)")
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"invalid --device {a.device!r}: {e}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {a.device!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device!r}: CUDA is not available here")
    a.rounds = a.rounds or (2 if a.smoke else 12)
    a.min_run_time = a.min_run_time if a.min_run_time is not None else (0.01 if a.smoke else 1.0)
    a.threads = a.threads or (1 if a.smoke else torch.get_num_threads())
    try:
        a.batch_fractions = sorted({float(f) for f in a.batch_fractions.split(",") if f}, reverse=True)
    except ValueError:
        p.error(f"invalid --batch-fractions {a.batch_fractions!r} (expected numbers in (0, 1], e.g. 1,0.25)")
    if not a.batch_fractions or not all(0 < f <= 1 for f in a.batch_fractions):
        p.error(f"invalid --batch-fractions {a.batch_fractions!r} (expected numbers in (0, 1], e.g. 1,0.25)")
    a.batch_fractions = tuple(int(f) if f == 1 else f for f in a.batch_fractions)
    a.sections = [s for s in a.sections.split(",") if s]
    if bad := [s for s in a.sections if s not in SECTIONS]:
        p.error(f"unknown section(s) {bad}; choose from {','.join(SECTIONS)}")
    a.optimizers = [o for o in a.optimizers.split(",") if o]
    if bad := [o for o in a.optimizers if o not in names]:
        p.error(f"unknown optimizer(s) {bad}; choose from {','.join(names)}")
    a.optimizers = [o for o in names if o in a.optimizers or o == REFERENCE]  # canonical order
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    command = recorded_command(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if not a.quiet:
            print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    workload = build_workload(a.model, a.batch, a.seed).to(device)
    ctx = Context(
        workload,
        device,
        a.optimizers,
        threads=a.threads,
        rounds=a.rounds,
        min_run_time=a.min_run_time,
        k=a.k,
        seed=a.seed,
        compile=a.compile,
        fractions=a.batch_fractions,
        log=log,
    )
    res: dict = {"meta": _meta(a, command, workload, device), "complete": False}
    for name in a.sections:
        res[name] = SECTIONS[name](ctx)
        res["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
        _write(a.json, res)
    res["meta"]["loadavg_end"] = _loadavg()
    res["complete"] = True
    res = _jsonable(res)
    _write(a.json, res)
    if not a.quiet:
        print("\n" + markdown(res))
    return res


def recorded_command(argv: list[str] | None) -> str:
    """The command line the results record: as typed in the working directory (the project root),
    ``python -m flatsophia.bench ...`` with paths inside it relative, so it reruns on any checkout."""
    return shown_command(sys.orig_argv if argv is None else ["python", "-m", "flatsophia.bench", *argv])


def _meta(a, command: str, workload, device: torch.device) -> dict:
    commit = _git("rev-parse", "HEAD")
    return dict(
        command=command,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        git_commit=commit,
        git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        torch=torch.__version__,
        python=platform.python_version(),
        packages=_versions("timm", "sophia_opt"),
        machine=f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()}",
        device=str(device)
        if device.type == "cpu"
        else f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})",
        threads=a.threads,
        model=a.model,
        workload=workload.description,
        n_params=workload.n_params,
        n_tensors=workload.n_tensors,
        predictions_per_step=workload.predictions,
        rounds=a.rounds,
        min_run_time_s=a.min_run_time,
        k=a.k,
        batch_fractions=list(a.batch_fractions),
        compile=a.compile,
        smoke=a.smoke,
        seed=a.seed,
        sections=a.sections,
        optimizers=a.optimizers,
        loadavg_start=_loadavg(),
    )


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _versions(*modules: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for m in modules:
        try:
            out[m] = version(m.replace("_", "-"))
        except PackageNotFoundError:
            out[m] = None
    return out


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(w) for k, w in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(w) for w in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _write(path: str | None, res: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(_jsonable(res), indent=1) + "\n")


if __name__ == "__main__":
    main()
