"""Claim studies end to end: fair tuning, seeded runs with controls, ablation grid, report.

A *study* compares optimizers on one experiment the way MLCommons AlgoPerf's external tuning
ruleset does, with the project's own entry point (``src/train.py``) and sweepers:

1. **tune** -- every optimizer gets the same number of quasi-random trials
   (``hparams_search=qmc_<optimizer>``: scrambled Halton points over the search space the optimizer
   declares) on a tuning seed that no reported run uses; the objective is the study's
   ``optimized_metric`` (``val/loss_best`` by default: the early-stopped validation loss).
2. **runs** -- the best trial's setting of each optimizer over the report seeds, plus the study's
   controls (variants built from a tuned setting, e.g. FlatSophia with a random mask), each with
   ``test_final=true`` so that the held-out test split is scored at the best-validation checkpoint
   and at the end of training.
3. **ablation** -- an optional grid (``ablation=<name>``) around a tuned setting.
4. **report** -- :func:`flatsophia.experiments.summarize.summarize` over the runs (Markdown table, paired
   per-seed differences, curves), a tuning table (every trial, the chosen setting, compute spent),
   written to ``<out>/report`` and optionally copied to a docs folder.

Each phase is a set of ``python src/train.py -m ...`` commands (printed, and listed in
``<out>/commands.txt``), run as subprocesses with at most ``--jobs`` training processes at once.
Phases read what earlier phases wrote, so they can be run one at a time (``--phase``).

    python scripts/claim.py overfit --jobs 2                   # this machine's 2 cores (hours)
    python scripts/claim.py overfit --jobs 20 --device gpu     # one GPU, 20 processes sharing it
    python scripts/claim.py charlm --phase report --out logs/claims/charlm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from flatsophia.commandline import shown_command

__all__ = ["STUDIES", "Study", "Variant", "Task", "main", "plan_tuning", "plan_runs", "plan_ablation", "report"]



def project_root() -> Path:
    """The project checkout whose ``src/train.py`` and ``conf/`` the studies run.

    ``$PROJECT_ROOT`` if set, else the first folder holding both at or above the working directory,
    else the checkout this package was installed from in editable mode. A non-editable install has
    neither, so run the studies from the project checkout (or set ``PROJECT_ROOT``).
    """
    env = os.environ.get("PROJECT_ROOT")
    candidates = [Path(env)] if env else []
    cwd = Path.cwd().resolve()
    candidates += [cwd, *cwd.parents, Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / "src" / "train.py").is_file() and (root / "conf" / "train.yaml").is_file():
            return root
    raise FileNotFoundError(
        "Cannot find the project checkout (a folder with src/train.py and conf/train.yaml) at or above "
        f"{cwd}{f' or at PROJECT_ROOT={env}' if env else ''}; run from the checkout or set PROJECT_ROOT."
    )


@dataclass(frozen=True)
class Variant:
    """A seeded run group: ``base``'s tuned setting, optionally changed.

    ``optimizer``: the optimizer config to run (default: ``base``). ``lr_scale``: multiplies the tuned
    learning rate; a callable gets the tuned setting (a dict of override -> value) and returns the
    scale. ``drop``: tuned keys not passed on (keys the other optimizer lacks). ``extra``: more overrides.
    """

    name: str
    base: str
    optimizer: str | None = None
    extra: tuple[str, ...] = ()
    lr_scale: object = None
    drop: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Study:
    experiment: str
    optimizers: tuple[str, ...]
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    #: how the steps-to-target target is set: ("best"|"final", optimizer) = that optimizer's mean
    target_rule: tuple[str, str] = ("final", "adamw")
    #: more targets, reported in a small table of their own (same rule format)
    extra_targets: tuple[tuple[str, str], ...] = ()
    ablation: str | None = None
    ablation_base: str | None = None
    ablation_seeds: tuple[int, ...] = (0,)
    tune_seed: int = 1000
    trials: int = 5
    description: str = ""
    #: overrides of every run of the study, after ``experiment=...`` (e.g. to keep a published protocol)
    overrides: tuple[str, ...] = ()


def mask_step_shrink(setting: dict) -> float:
    """Mean factor by which FlatSophia's mask shrinks the step: ``1 - f + f / dampening``."""
    f = float(setting.get("optimizer.sharp_fraction", 0.2))
    damp = float(setting.get("optimizer.dampening_factor", 10))
    return 1.0 - f + f / damp


STUDIES: dict[str, Study] = {
    "overfit": Study(
        experiment="flat_sophia_overfit",
        optimizers=("adamw", "sophia_h", "flat_sophia", "soap"),
        seeds=(0, 1, 2, 3, 4),
        variants=(
            Variant(
                "flat_sophia_random",
                "flat_sophia",
                extra=("optimizer.mask_source=random",),
                note="control: a random mask of the same share (redrawn at each refresh)",
            ),
            Variant(
                "sophia_h_matched",
                "flat_sophia",
                optimizer="sophia_h",
                lr_scale=mask_step_shrink,
                drop=("optimizer.sharp_fraction", "optimizer.dampening_factor", "optimizer.mask_source"),
                note="control: Sophia-H with FlatSophia's tuned setting, lr x the mask's mean step shrink",
            ),
            Variant(
                "flat_sophia_rademacher",
                "flat_sophia",
                extra=("hessian.distribution=rademacher",),
                note="variance-reduced mask: Rademacher probe",
            ),
            Variant(
                "flat_sophia_probes4",
                "flat_sophia",
                extra=("hessian.n_probes=4",),
                note="variance-reduced mask: mean of 4 Gaussian probes",
            ),
            Variant(
                "flat_sophia_ema",
                "flat_sophia",
                extra=("optimizer.mask_source=ema",),
                note="variance-reduced mask: ranked by the Hessian EMA instead of the fresh estimate",
            ),
        ),
        pairs=(
            ("flat_sophia", "sophia_h"),
            ("flat_sophia", "flat_sophia_random"),
            ("flat_sophia", "sophia_h_matched"),
            ("flat_sophia", "adamw"),
            ("flat_sophia_rademacher", "flat_sophia"),
            ("flat_sophia_probes4", "flat_sophia"),
            ("flat_sophia_ema", "flat_sophia"),
        ),
        target_rule=("best", "adamw"),
        extra_targets=(("best", "sophia_h"),),
        ablation="flat_sophia_mask",
        ablation_base="flat_sophia",
        ablation_seeds=(0, 1),
        description="FlatSophia against overfitting: over-wide, shallow ViT on MNIST-1D (1,100 training signals)",
    ),
    "charlm": Study(
        experiment="sophia_charlm",
        optimizers=("adamw", "sophia_g", "sophia_h", "soap"),
        seeds=(0, 1, 2),
        pairs=(("sophia_g", "adamw"), ("sophia_h", "adamw"), ("soap", "adamw")),
        target_rule=("final", "adamw"),
        # and the other way round: how many steps AdamW needs to reach where Sophia ends
        extra_targets=(("final", "sophia_g"), ("final", "sophia_h")),
        description="The Sophia paper's claim at small scale: small GPT on the embedded character corpus",
        # the protocol as run (docs/claims.md, 2): weight decay 0.2 and each optimizer's default betas/rho for
        # all, not the experiment's per-optimizer values (conf/per_optimizer/*_sophia_charlm.yaml, added later)
        overrides=("~per_optimizer", "optimizer.weight_decay=0.2"),
    ),
}

DEVICE_OVERRIDES = {
    "cpu": ("trainer=cpu",),
    # Full fp32 on the GPU too, so that GPU and CPU runs optimise the same objective.
    "gpu": ("trainer=gpu", "trainer.precision=32-true"),
}
#: Overrides of every training process: no live progress bar (logs of parallel jobs), CSV metrics.
QUIET = ("~callbacks.progress_bar", "++trainer.enable_progress_bar=false", "logger=csv")


@dataclass
class Task:
    """One ``src/train.py -m`` command using ``procs`` training processes at once."""

    name: str
    argv: list[str]
    procs: int
    log: Path
    returncode: int | None = None
    seconds: float = math.nan

    def shell(self) -> str:
        """The command as typed in the project root (``python src/train.py -m ...``, relative paths)."""
        return shown_command(self.argv, project_root())


def _train_argv(overrides: Sequence[str]) -> list[str]:
    return [sys.executable, str(project_root() / "src" / "train.py"), "-m", *overrides]


def _common(study: Study, device: str, extra: Sequence[str]) -> list[str]:
    if device not in DEVICE_OVERRIDES:
        raise ValueError(f"Invalid device: {device!r} ({' | '.join(DEVICE_OVERRIDES)})")
    return [f"experiment={study.experiment}", *study.overrides, *DEVICE_OVERRIDES[device], *QUIET, *extra]


def plan_tuning(study: Study, out: Path, device: str = "cpu", extra: Sequence[str] = ()) -> list[Task]:
    """One Optuna (QMC) study per optimizer, its trials run in parallel by the joblib launcher."""
    tasks = []
    for opt in study.optimizers:
        sweep_dir = out / "tune" / opt
        argv = _train_argv(
            [
                *_common(study, device, extra),
                f"hparams_search=qmc_{opt}",
                f"seed={study.tune_seed}",
                f"variant={opt}",
                "test=false",
                "hydra/launcher=joblib",
                f"hydra.launcher.n_jobs={study.trials}",
                f"hydra.sweeper.n_trials={study.trials}",
                f"hydra.sweeper.n_jobs={study.trials}",
                # a diverging trial is a bad trial, not a failed study
                "hydra.sweeper.max_failure_rate=1.0",
                f"hydra.sweep.dir={sweep_dir}",
            ]
        )
        tasks.append(Task(f"tune/{opt}", argv, study.trials, out / "logs" / f"tune_{opt}.log"))
    return tasks


def tuned_setting(out: Path, optimizer: str) -> dict[str, object]:
    """The best trial's overrides of ``<out>/tune/<optimizer>/optimization_results.yaml``."""
    path = out / "tune" / optimizer / "optimization_results.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the tune phase first (--phase tune)")
    res = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return dict(res["best_params"])


def variant_setting(study: Study, variant: Variant, out: Path) -> tuple[str, dict[str, object]]:
    """``(optimizer, overrides)`` of a variant from its base's tuned setting."""
    setting = tuned_setting(out, variant.base)
    opt = variant.optimizer or variant.base
    if variant.lr_scale is not None:
        scale = variant.lr_scale(setting) if callable(variant.lr_scale) else float(variant.lr_scale)
        setting["optimizer.lr"] = float(setting["optimizer.lr"]) * scale
    for key in variant.drop:
        setting.pop(key, None)
    return opt, setting


def _all_variants(study: Study) -> list[Variant]:
    return [Variant(o, o) for o in study.optimizers] + list(study.variants)


def _seeded_task(
    name, study, out, device, extra, opt, setting, more, seeds, sweep_dir, procs, variant: str | None
) -> Task:
    """One multirun over ``seeds`` (times any grid in ``more``) with ``procs`` jobs at once."""
    overrides = [
        *_common(study, device, extra),
        f"optimizer={opt}",
        *(f"{k}={v}" for k, v in setting.items()),
        *more,
        *([f"variant={variant}"] if variant else []),
        "seed=" + ",".join(str(s) for s in seeds),
        "test_final=true",
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={procs}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    return Task(name, _train_argv(overrides), procs, out / "logs" / f"{sweep_dir.name}.log")


def plan_runs(
    study: Study,
    out: Path,
    device: str = "cpu",
    extra: Sequence[str] = (),
    jobs: int = 2,
    only: Sequence[str] | None = None,
) -> list[Task]:
    """The tuned optimizers and the variants (or the ``only`` ones, in that order) over the report seeds."""
    variants = {v.name: v for v in _all_variants(study)}
    if only is not None:
        unknown = [name for name in only if name not in variants]
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown} of this study (known: {', '.join(variants)})")
    tasks = []
    for variant in [variants[n] for n in only] if only is not None else variants.values():
        opt, setting = variant_setting(study, variant, out)
        sweep_dir = out / "runs" / variant.name
        tasks.append(
            _seeded_task(
                variant.name,
                study,
                out,
                device,
                extra,
                opt,
                setting,
                variant.extra,
                study.seeds,
                sweep_dir,
                procs=min(len(study.seeds), jobs),
                variant=variant.name,
            )
        )
    return tasks


def plan_ablation(study: Study, out: Path, device: str = "cpu", extra: Sequence[str] = (), jobs: int = 2) -> list[Task]:
    """The ablation grid around the base optimizer's tuned setting (its grid keys are not fixed)."""
    if study.ablation is None:
        return []
    base = study.ablation_base or study.optimizers[0]
    setting = tuned_setting(out, base)
    grid = OmegaConf.load(project_root() / "conf" / "ablation" / f"{study.ablation}.yaml").hydra.sweeper.params
    for key in grid:
        setting.pop(key, None)
    n = math.prod(len(str(v).split(",")) for v in grid.values()) * len(study.ablation_seeds)
    task = _seeded_task(
        f"ablation_{study.ablation}",
        study,
        out,
        device,
        extra,
        base,
        setting,
        [f"ablation={study.ablation}"],
        study.ablation_seeds,
        out / "ablation" / study.ablation,
        procs=min(n, jobs),
        variant=None,  # grid points are told apart by their settings
    )
    return [task]


def run_tasks(tasks: list[Task], jobs: int, deadline: float | None = None, env: dict | None = None) -> list[Task]:
    """Run the commands with at most ``jobs`` training processes at once (a task's ``procs`` count)."""
    pending, running = list(tasks), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    root = project_root()
    while pending or running:
        while pending and (not running or sum(t.procs for t, _, _ in running) + pending[0].procs <= jobs):
            task = pending.pop(0)
            if deadline is not None and time.time() > deadline:
                print(f"[claim] deadline passed: not starting {task.name}", flush=True)
                continue
            task.log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(task.log, "w")  # noqa: SIM115 - closed when the process ends
            fh.write(shlex.join(task.argv) + "\n\n")  # this machine's log: the exact command
            fh.flush()
            print(f"[claim] start {task.name} ({task.procs} processes)", flush=True)
            running.append(
                (task, subprocess.Popen(task.argv, stdout=fh, stderr=subprocess.STDOUT, cwd=root, env=env), fh)
            )
            task.seconds = time.time()
        time.sleep(0.5)
        for item in list(running):
            task, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                task.returncode = proc.returncode
                task.seconds = time.time() - task.seconds
                running.remove(item)
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}; see {task.log})"
                print(f"[claim] done  {task.name} in {task.seconds:.0f} s: {status}", flush=True)
    return tasks


# ------------------------------------------------------------------- report
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]")


def _job_seconds(job_dir: Path) -> float:
    """Wall time of one job: first to last timestamp of its Hydra log (``<job>/*.log``); else the
    last write of its metrics.csv minus the write of its config (file times; lost by plain copies)."""
    stamps = []
    for log in sorted(job_dir.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            m = _STAMP.match(line)
            if m:
                stamps.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3)
    if len(stamps) >= 2:
        return max(stamps) - min(stamps)
    metrics = sorted(job_dir.glob("**/metrics.csv"))
    cfg = job_dir / ".hydra" / "config.yaml"
    if not metrics or not cfg.is_file():
        return math.nan
    return max(m.stat().st_mtime for m in metrics) - cfg.stat().st_mtime


def tuning_table(study: Study, out: Path) -> tuple[str, float]:
    """Markdown of every trial (setting, objective) with the chosen one marked; total job seconds."""
    from flatsophia.experiments.summarize import find_jobs, load_job

    lines, total = [], 0.0
    for opt in study.optimizers:
        sweep = out / "tune" / opt
        if not sweep.is_dir():
            continue
        best = tuned_setting(out, opt) if (sweep / "optimization_results.yaml").is_file() else {}
        lines += [f"### {opt}", "", "| trial | setting | best val loss | chosen |", "|---|---|---:|---|"]
        for job_dir in find_jobs(sweep):
            job = load_job(job_dir)
            secs = _job_seconds(job_dir)
            total += 0.0 if math.isnan(secs) else secs
            vals = job.metrics["val/loss"].dropna() if "val/loss" in job.metrics else pd.Series(dtype=float)
            value = float(vals.min()) if len(vals) else math.nan
            setting = ", ".join(f"{k}={_short(v)}" for k, v in job.overrides.items() if k.startswith("optimizer."))
            chosen = all(str(job.overrides.get(k)) == str(v) for k, v in best.items()) and bool(best)
            lines.append(f"| {job_dir.name} | {setting} | {value:.4f} | {'**yes**' if chosen else ''} |")
        lines.append("")
    return "\n".join(lines), total


def _short(v) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def _target(study: Study, out: Path, rule: tuple[str, str] | None = None) -> float | None:
    from flatsophia.experiments.summarize import load_runs

    kind, opt = rule or study.target_rule
    sweep = out / "runs" / opt
    if not sweep.is_dir():
        return None
    runs, _, _ = load_runs(sweep)
    col = "val_loss_best" if kind == "best" else "val_loss_final"
    return float(runs[col].mean())


def report(
    study: Study | str,
    out: Path,
    docs: Path | None = None,
    device: str = "cpu",
    seconds: dict | None = None,
    name: str | None = None,
) -> Path:
    """Summarize the runs (and ablation) into ``<out>/report``; copy it to ``docs`` if given."""
    from flatsophia.experiments.summarize import _mean_std, fmt_mean_std, load_runs, summarize

    study_name = name or (study if isinstance(study, str) else study.experiment)
    study = STUDIES[study] if isinstance(study, str) else study
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    run_dirs = sorted(p for p in (out / "runs").iterdir() if p.is_dir()) if (out / "runs").is_dir() else []
    if not run_dirs:
        raise FileNotFoundError(f"No runs under {out / 'runs'}: run the runs phase first")
    target = _target(study, out)
    present = {p.name for p in run_dirs}
    pairs = [p for p in study.pairs if p[0] in present and p[1] in present]
    summary = summarize(run_dirs, target=target, out=rep, pair=pairs or None)
    tune_md, tune_secs = tuning_table(study, out)
    run_secs = sum(_job_seconds(j.path) for j in summary.jobs)
    parts = [
        f"# Study `{study_name}`: {study.description}",
        "",
        f"Experiment `experiment={study.experiment}`; report seeds {list(study.seeds)}; tuning seed "
        f"{study.tune_seed}; {study.trials} quasi-random trials per optimizer (`hparams_search=qmc_<optimizer>`); "
        f"device: {device}.",
        "",
        f"Target for steps-to-target: {study.target_rule[1]}'s mean {study.target_rule[0]} val loss"
        + (f" = {target:.4f}." if target is not None else " (not available)."),
        "",
        f"Compute: tuning {len(list((out / 'tune').glob('*/*/.hydra')))} runs, {tune_secs / 60:.1f} min of job time; "
        f"seeded runs {len(summary.jobs)} runs, {run_secs / 60:.1f} min of job time (jobs ran in parallel).",
        "",
        "Variants:",
        "",
    ]
    for v in _all_variants(study):
        if v.name in present:
            opt, setting = variant_setting(study, v, out)
            desc = ", ".join(f"`{k}={_short(val)}`" for k, val in setting.items())
            more = ", ".join(f"`{e}`" for e in v.extra)
            parts.append(
                f"- **{v.name}**: `optimizer={opt}` {desc}{', ' + more if more else ''}"
                + (f" ({v.note})" if v.note else "")
            )
    parts += ["", "## Tuning trials", "", tune_md, "## Results", "", summary.markdown.split("\n", 2)[2]]
    for rule in study.extra_targets:
        value = _target(study, out, rule)
        if value is None:
            continue
        runs, _, _ = load_runs(run_dirs, target=value)
        parts += [f"## Steps to {rule[1]}'s mean {rule[0]} val loss ({value:.4f})", ""]
        parts += ["| optimizer | reached | steps (mean ± std over the seeds that reached it) |", "|---|---|---|"]
        for opt, group in runs.groupby("optimizer", sort=False):
            reached = group["steps_to_target"].dropna()
            cell = fmt_mean_std(*_mean_std(reached)[:2]) if len(reached) else "-"
            parts.append(f"| {opt} | {len(reached)}/{len(group)} | {cell} |")
        parts.append("")
    if study.ablation and (out / "ablation" / study.ablation).is_dir():
        abl = summarize(out / "ablation" / study.ablation, out=rep / "ablation")
        parts += ["## Ablation", "", abl.markdown.split("\n", 2)[2]]
    (rep / "report.md").write_text("\n".join(parts))
    (rep / "runs.csv").write_text(summary.runs.to_csv(index=False))
    if seconds:
        (rep / "phases.json").write_text(json.dumps(seconds, indent=2))
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        for f in rep.glob("*"):
            if f.is_file():
                shutil.copy2(f, docs / f.name)
    print(f"[claim] report: {rep / 'report.md'}", flush=True)
    return rep / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", choices=sorted(STUDIES), help="which study")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default logs/claims/<study>)")
    parser.add_argument("--phase", action="append", choices=("tune", "runs", "ablation", "report", "all"), default=None)
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once (default 2)")
    parser.add_argument("--device", choices=sorted(DEVICE_OVERRIDES), default="cpu")
    parser.add_argument("--docs", type=Path, default=None, help="also copy the report to this folder")
    parser.add_argument("--deadline-min", type=float, default=None, help="start no command after this many minutes")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials per optimizer (default: the study's)")
    parser.add_argument("--seeds", default=None, help="report seeds, e.g. 0,1,2 (default: the study's)")
    parser.add_argument("--variants", default=None, help="runs phase: only these variants, e.g. adamw,flat_sophia")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the tune phase and stop")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. trainer.max_epochs=2)")
    args = parser.parse_intermixed_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    study = STUDIES[args.study]
    if args.trials is not None:
        if args.trials < 1:
            parser.error(f"--trials must be >= 1, got {args.trials}")
        study = dataclasses.replace(study, trials=args.trials)
    if args.seeds is not None:
        try:
            seeds = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        study = dataclasses.replace(study, seeds=seeds, ablation_seeds=seeds[:1])
    out = (args.out or project_root() / "logs" / "claims" / args.study).resolve()
    phases = args.phase or ["all"]
    if "all" in phases:
        phases = ["tune", "runs", "ablation", "report"]
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
    if args.dry_run:
        for t in plan_tuning(study, out, args.device, args.overrides):
            print(t.shell())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    seconds, failed = {}, []
    commands = out / "commands.txt"
    for phase in ("tune", "runs", "ablation"):
        if phase not in phases:
            continue
        if phase == "tune":
            tasks = plan_tuning(study, out, args.device, args.overrides)
        elif phase == "runs":
            only = args.variants.split(",") if args.variants else None
            tasks = plan_runs(study, out, args.device, args.overrides, args.jobs, only)
        else:
            tasks = plan_ablation(study, out, args.device, args.overrides, args.jobs)
        with commands.open("a") as fh:
            fh.writelines(t.shell() + "\n" for t in tasks)
        start = time.time()
        run_tasks(tasks, args.jobs, deadline)
        seconds[phase] = time.time() - start
        failed += [t.name for t in tasks if t.returncode not in (0, None)]
        if failed:
            break  # later phases need this one's results
    if "report" in phases:
        report(study, out, args.docs, args.device, seconds, name=args.study)
    if failed:
        print(f"[claim] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
