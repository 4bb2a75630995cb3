"""Summarize a Hydra multirun (sweep) of ``src/train.py`` into a Markdown table and plots; no W&B needed.

Every job folder of the sweep (a folder holding ``.hydra/config.yaml``, found at any depth) gives one
run: its optimizer, its seed, its *setting* and its Lightning ``metrics.csv`` (found by globbing
inside the job folder, any logger sub-path).

* **optimizer** (the group label): ``variant`` of ``.hydra/config.yaml`` when set (a free label such
  as ``flat_sophia_random``); else ``hydra.runtime.choices.optimizer`` of ``.hydra/hydra.yaml``; else
  ``module.optimizer_name`` of ``.hydra/config.yaml`` (when it is a plain string); else the class name
  of ``optimizer._target_``.
* **seed**: ``seed`` of ``.hydra/config.yaml``.
* **setting**: the command-line overrides of ``.hydra/overrides.yaml`` other than ``optimizer``,
  ``seed`` and ``hydra.*`` whose values are not the same in every job (e.g.
  ``optimizer.lr=0.001``), so that a sweep over learning rates groups into one row per value.
  Overrides shared by all jobs are listed once above the table.

Runs are grouped by (optimizer, setting); every number of the table is ``mean ± std`` over the
seeds of the group (``std``: sample standard deviation, ``ddof=1``; only the mean with one seed).

Per-run quantities (columns of :attr:`Summary.runs`; the CSV ``step`` column is Lightning's logging
step, for validation rows the index of the last training batch, i.e. optimizer steps - 1 with
``module.accumulate=1``; the sharpness callback logs the number of optimizer steps taken):

* ``val_loss_best`` / ``val_loss_best_step`` / ``val_loss_final``: min of ``val/loss``, the step of
  its first occurrence, its last value; ``val_loss_rise``: final - best (how much it overfits after
  its best point); ``val_acc_best`` (max) / ``val_acc_final`` likewise;
* ``metric_best`` / ``metric_best_step`` / ``metric_final``: the same for ``--metric`` (min, or max
  for a metric whose name contains ``acc``, or ``--mode``);
* ``test_loss`` / ``test_acc``: last logged ``test/loss`` / ``test/acc`` (the best checkpoint);
  ``test_final_loss`` / ``test_final_acc``: ``test_final/loss`` / ``test_final/acc`` (the final
  weights, ``test_final=true``);
* ``top_eig_final`` / ``trace_final``: last logged ``sharpness/top_eig`` / ``sharpness/trace``;
* ``ms_per_step``: wall-clock milliseconds per optimizer step, from the first source available:
  a ``time/step_ms`` column (median: robust to a stray slow step; the training module logs the mean
  over the last ``every_k`` steps, so it includes the periodic Hessian refresh), a ``train/step_time`` column
  (seconds, median), a ``wall_time``
  column (seconds; its span over the span of ``step``), else the file times: (modification time of
  ``metrics.csv`` - modification time of ``.hydra/config.yaml``, written at job start) / max ``step``.
  The last one includes setup, validation and testing, so it over-estimates the step time; the
  ``time_source`` column says which one was used;
* ``steps_to_target``: first ``step`` where ``--metric <= --target`` (``>=`` for a max metric),
  NaN ("not reached") otherwise; ``time_to_target_s``: from ``wall_time`` when there is such a
  column (time since the first row), else ``steps_to_target * ms_per_step / 1000``. The table shows
  mean ± std over the seeds that reached the target and how many did.

``--pair A,B`` (repeatable) adds a paired table: for every setting and seed run with both optimizers, the
difference A - B of best and final ``--metric`` (and of the test loss/accuracy when logged): mean,
std, the per-seed differences and the number of seeds where A < B.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from flatsophia.commandline import shown_path

__all__ = [
    "Summary",
    "find_jobs",
    "load_job",
    "load_runs",
    "aggregate",
    "paired_differences",
    "plot_curves",
    "to_markdown",
    "summarize",
    "main",
]

#: Quantities aggregated over seeds, in table order: (column, header).
QUANTITIES = [
    ("val_loss_best", "best val loss"),
    ("val_loss_best_step", "step of best"),
    ("val_loss_final", "final val loss"),
    ("val_loss_rise", "val loss rise (final - best)"),
    ("metric_best", "best {metric}"),
    ("metric_best_step", "step of best {metric}"),
    ("metric_final", "final {metric}"),
    ("val_acc_best", "best val acc"),
    ("val_acc_final", "final val acc"),
    ("test_loss", "test loss"),
    ("test_acc", "test acc"),
    ("test_final_loss", "final test loss"),
    ("test_final_acc", "final test acc"),
    ("top_eig_final", "final top eig"),
    ("trace_final", "final trace"),
    ("ms_per_step", "ms/step"),
    ("steps_to_target", "steps to {target}"),
    ("time_to_target_s", "time to {target} (s)"),
]
#: Override keys that identify the optimizer or the seed, not the setting.
_NOT_SETTING = ("optimizer", "seed", "variant")


# --------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One job folder of a sweep."""

    path: Path
    optimizer: str
    seed: object
    overrides: dict[str, str]
    metrics: pd.DataFrame
    metrics_files: list[Path]
    config_file: Path
    setting: str = ""


def find_jobs(sweep_dirs: Path | str | Sequence[Path | str]) -> list[Path]:
    """Job folders (those with ``.hydra/config.yaml``) under the given folders, sorted naturally."""
    dirs = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    jobs: list[Path] = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"Not a folder: {d}")
        found = sorted({p.parent.parent for p in d.glob("**/.hydra/config.yaml")}, key=_natural_key)
        if not found:
            raise FileNotFoundError(f"No job folder (with .hydra/config.yaml) under {d}")
        jobs.extend(found)
    return jobs


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _load_yaml(path: Path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def _dig(tree, dotted: str):
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _optimizer_name(hydra_cfg, cfg) -> str:
    variant = _dig(cfg, "variant")
    if isinstance(variant, str) and variant:
        return variant
    name = _dig(hydra_cfg, "hydra.runtime.choices.optimizer")
    if isinstance(name, str) and name:
        return name
    name = _dig(cfg, "module.optimizer_name")
    if isinstance(name, str) and name and "${" not in name:
        return name
    target = _dig(cfg, "optimizer._target_")
    if isinstance(target, str) and target:
        return target.rsplit(".", 1)[-1].rsplit(":", 1)[-1]
    return "unknown"


def _parse_overrides(lines) -> dict[str, str]:
    out = {}
    for line in lines or []:
        key, _, value = str(line).partition("=")
        key = key.lstrip("+~")
        if key in _NOT_SETTING or key.startswith("hydra."):
            continue
        out[key] = value
    return out


def _read_metrics(files: list[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(f) for f in files if f.stat().st_size > 0]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame({"step": pd.Series(dtype=float)})
    df = pd.concat(frames, ignore_index=True, sort=False)
    if "step" not in df.columns:
        raise ValueError(f"No 'step' column in {files}")
    return df


def load_job(job_dir: Path | str) -> Job:
    """Read one job folder: optimizer, seed, overrides and the concatenated ``metrics.csv`` files."""
    job_dir = Path(job_dir)
    config_file = job_dir / ".hydra" / "config.yaml"
    cfg = _load_yaml(config_file) or {}
    hydra_cfg = _load_yaml(job_dir / ".hydra" / "hydra.yaml")
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml")
    # metrics.csv of several logger versions (a resumed run) are read in version order.
    files = sorted(job_dir.glob("**/metrics.csv"), key=_natural_key)
    return Job(
        path=job_dir,
        optimizer=_optimizer_name(hydra_cfg, cfg),
        seed=cfg.get("seed"),
        overrides=_parse_overrides(overrides),
        metrics=_read_metrics(files),
        metrics_files=files,
        config_file=config_file,
    )


def _short_value(value: str) -> str:
    """A float override value with 4 significant digits (``0.0015784962692`` -> ``0.001578``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if "." not in str(value) and "e" not in str(value).lower():
        return str(value)  # integers stay as written
    return f"{number:.4g}"


def _assign_settings(jobs: list[Job]) -> dict[str, str]:
    """Set ``job.setting`` from the overrides that differ between jobs; return the common ones."""
    keys = sorted({k for j in jobs for k in j.overrides})
    missing = object()
    varying = [k for k in keys if len({j.overrides.get(k, missing) for j in jobs}) > 1]
    for j in jobs:
        j.setting = ", ".join(f"{k}={_short_value(j.overrides[k])}" for k in varying if k in j.overrides)
    return {k: jobs[0].overrides[k] for k in keys if k not in varying}


# --------------------------------------------------------------- quantities
def _series(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows of ``df`` where ``column`` is logged: a frame with ``step`` and ``value`` (file order)."""
    if column not in df.columns:
        return pd.DataFrame({"step": [], "value": []})
    rows = df[df[column].notna()]
    return pd.DataFrame({"step": rows["step"].to_numpy(), "value": rows[column].to_numpy(dtype=float)})


def _best(df: pd.DataFrame, column: str, mode: str) -> tuple[float, float, float]:
    """(best value, step of its first occurrence, last value) of ``column``; NaNs if never logged."""
    s = _series(df, column)
    if s.empty:
        return math.nan, math.nan, math.nan
    i = s["value"].idxmin() if mode == "min" else s["value"].idxmax()
    return float(s["value"][i]), float(s["step"][i]), float(s["value"].iloc[-1])


def _last(df: pd.DataFrame, column: str) -> float:
    s = _series(df, column)
    return float(s["value"].iloc[-1]) if len(s) else math.nan


def _step_time(job: Job) -> tuple[float, str]:
    df = job.metrics
    if "time/step_ms" in df.columns and df["time/step_ms"].notna().any():
        return float(df["time/step_ms"].median()), "time/step_ms"
    if "train/step_time" in df.columns and df["train/step_time"].notna().any():
        return 1000.0 * float(df["train/step_time"].median()), "train/step_time"
    if "wall_time" in df.columns and df["wall_time"].notna().sum() >= 2:
        rows = df[df["wall_time"].notna()]
        span = float(rows["step"].max() - rows["step"].min())
        if span > 0:
            return 1000.0 * float(rows["wall_time"].max() - rows["wall_time"].min()) / span, "wall_time"
    steps = float(df["step"].max()) if len(df) else math.nan
    if job.metrics_files and job.config_file.is_file() and steps > 0:
        seconds = max(f.stat().st_mtime for f in job.metrics_files) - job.config_file.stat().st_mtime
        return 1000.0 * seconds / steps, "file mtimes"
    return math.nan, "none"


def _target(job: Job, metric: str, mode: str, target: float | None, ms_per_step: float) -> tuple[float, float]:
    if target is None:
        return math.nan, math.nan
    df = job.metrics
    if metric not in df.columns:
        return math.nan, math.nan
    hit = df[(df[metric] <= target) if mode == "min" else (df[metric] >= target)]
    if hit.empty:
        return math.nan, math.nan
    step = float(hit["step"].iloc[0])
    if "wall_time" in df.columns and df["wall_time"].notna().any() and pd.notna(hit["wall_time"].iloc[0]):
        return step, float(hit["wall_time"].iloc[0] - df["wall_time"].min())
    return step, step * ms_per_step / 1000.0


def _mode_of(metric: str, mode: str | None) -> str:
    if mode is None:
        return "max" if "acc" in metric else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"Invalid mode: {mode!r} (min or max)")
    return mode


def run_record(job: Job, metric: str = "val/loss", target: float | None = None, mode: str | None = None) -> dict:
    """The per-run quantities of one job (see the module docstring)."""
    mode = _mode_of(metric, mode)
    df = job.metrics
    rec: dict[str, object] = {
        "optimizer": job.optimizer,
        "setting": job.setting,
        "seed": job.seed,
        "job": shown_path(job.path),
    }
    rec["val_loss_best"], rec["val_loss_best_step"], rec["val_loss_final"] = _best(df, "val/loss", "min")
    rec["val_loss_rise"] = rec["val_loss_final"] - rec["val_loss_best"]  # overfitting after the best point
    rec["metric_best"], rec["metric_best_step"], rec["metric_final"] = _best(df, metric, mode)
    rec["val_acc_best"], _, rec["val_acc_final"] = _best(df, "val/acc", "max")
    rec["test_loss"] = _last(df, "test/loss")
    rec["test_acc"] = _last(df, "test/acc")
    rec["test_final_loss"] = _last(df, "test_final/loss")
    rec["test_final_acc"] = _last(df, "test_final/acc")
    rec["top_eig_final"] = _last(df, "sharpness/top_eig")
    rec["trace_final"] = _last(df, "sharpness/trace")
    rec["ms_per_step"], rec["time_source"] = _step_time(job)
    rec["steps_to_target"], rec["time_to_target_s"] = _target(job, metric, mode, target, rec["ms_per_step"])
    return rec


# ------------------------------------------------------------------ loading
def load_runs(
    sweep_dirs: Path | str | Sequence[Path | str],
    metric: str = "val/loss",
    target: float | None = None,
    mode: str | None = None,
) -> tuple[pd.DataFrame, list[Job], dict[str, str]]:
    """``(runs, jobs, common_overrides)``: one row per job, the loaded jobs, overrides shared by all."""
    jobs = [load_job(p) for p in find_jobs(sweep_dirs)]
    common = _assign_settings(jobs)
    runs = pd.DataFrame([run_record(j, metric, target, mode) for j in jobs])
    return runs, jobs, common


def _mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan), len(vals)


def aggregate(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (optimizer, setting): ``n_seeds``, ``seeds`` and ``<q>_mean`` / ``<q>_std`` / ``<q>_n``."""
    rows = []
    for (opt, setting), group in runs.groupby(["optimizer", "setting"], sort=False, dropna=False):
        row: dict[str, object] = {
            "optimizer": opt,
            "setting": setting,
            "n_seeds": len(group),
            "seeds": list(group["seed"]),
        }
        for q, _ in QUANTITIES:
            row[f"{q}_mean"], row[f"{q}_std"], row[f"{q}_n"] = _mean_std(group[q])
        sources = sorted(set(group["time_source"]))
        row["time_source"] = ", ".join(sources)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(runs: pd.DataFrame, a: str, b: str, metric: str = "val/loss") -> pd.DataFrame:
    """Per-seed differences ``a - b`` for every setting (see the module docstring); empty if no pairs.

    Runs are matched by seed within a setting; a setting of ``a`` that ``b`` lacks is matched with
    ``b``'s only setting when ``b`` has exactly one (e.g. a sweep over an ``a``-only hyperparameter).
    """
    ra, rb = runs[runs["optimizer"] == a], runs[runs["optimizer"] == b]
    quantities = [("metric_best", f"best {metric}"), ("metric_final", f"final {metric}")]
    if metric == "val/loss":
        quantities.append(("val_loss_rise", "val loss rise"))
    quantities += [
        (q, label)
        for q, label in (
            ("test_loss", "test loss"),
            ("test_acc", "test acc"),
            ("test_final_loss", "final test loss"),
            ("test_final_acc", "final test acc"),
        )
        if runs[q].notna().any()
    ]
    b_settings = list(dict.fromkeys(rb["setting"]))
    rows = []
    for setting in dict.fromkeys(ra["setting"]):
        sb = setting if setting in b_settings else (b_settings[0] if len(b_settings) == 1 else None)
        if sb is None:
            continue
        ga = ra[ra["setting"] == setting].drop_duplicates("seed", keep="last").set_index("seed")
        gb = rb[rb["setting"] == sb].drop_duplicates("seed", keep="last").set_index("seed")
        seeds = [s for s in ga.index if s in gb.index]
        for q, label in quantities:
            diffs = {s: float(ga.at[s, q] - gb.at[s, q]) for s in seeds}
            diffs = {s: d for s, d in diffs.items() if not math.isnan(d)}
            if not diffs:
                continue
            mean, std, n = _mean_std(diffs.values())
            rows.append(
                {
                    "setting": setting if sb == setting else f"{setting or '-'} vs {sb or '-'}",
                    "quantity": label,
                    "n_pairs": n,
                    "mean_diff": mean,
                    "std_diff": std,
                    "diffs": diffs,
                    "a_better": sum(d < 0 for d in diffs.values()),
                }
            )
    return pd.DataFrame(rows, columns=["setting", "quantity", "n_pairs", "mean_diff", "std_diff", "diffs", "a_better"])


# ---------------------------------------------------------------- markdown
def fmt(x: float, digits: int = 4) -> str:
    """A number with ``digits`` significant digits ("-" for NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def fmt_mean_std(mean: float, std: float, digits: int = 4) -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    if isinstance(std, float) and math.isnan(std):
        return fmt(mean, digits)
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def _shown_quantities(table: pd.DataFrame, metric: str, target_label: str | None) -> list[tuple[str, str]]:
    out = []
    for q, header in QUANTITIES:
        if q.startswith("metric_") and metric == "val/loss":
            continue  # the same as the val_loss_* columns
        if q in ("steps_to_target", "time_to_target_s"):
            if target_label is None:
                continue
        elif not table[f"{q}_n"].gt(0).any():
            continue
        out.append((q, header.format(metric=metric, target=target_label)))
    return out


def to_markdown(
    table: pd.DataFrame,
    runs: pd.DataFrame,
    paired: pd.DataFrame | None = None,
    metric: str = "val/loss",
    target: float | None = None,
    title: str = "Sweep summary",
    common: dict[str, str] | None = None,
    pair: tuple[str, str] | Sequence[tuple[str, str]] | None = None,
    digits: int = 4,
    mode: str | None = None,
) -> str:
    """The Markdown report: the per-group table, the paired table(s) and the per-run table.

    ``pair``/``paired``: one pair and its table, or a list of pairs and a list of their tables.
    """
    parts = [f"# {title}", ""]
    if common:
        parts += ["Overrides shared by every run: " + ", ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    parts += [
        f"{len(runs)} runs. Cells: mean ± std over seeds (sample std). Steps are the `step` column of "
        "Lightning's metrics.csv. ms/step from: " + ", ".join(sorted(set(runs["time_source"]))) + ".",
        "",
    ]
    mode = _mode_of(metric, mode)
    target_label = None if target is None else f"{metric} {'<=' if mode == 'min' else '>='} {fmt(target, digits)}"
    shown = _shown_quantities(table, metric, target_label)
    # One setting per optimizer label (e.g. tuned variants): the setting column adds nothing.
    with_setting = bool(table["setting"].astype(bool).any()) and table["optimizer"].duplicated().any()
    header = ["optimizer"] + (["setting"] if with_setting else []) + ["seeds"] + [h for _, h in shown]
    rows = []
    for _, r in table.iterrows():
        cells = [r["optimizer"]] + ([r["setting"] or "-"] if with_setting else []) + [str(r["n_seeds"])]
        for q, _ in shown:
            cell = fmt_mean_std(r[f"{q}_mean"], r[f"{q}_std"], digits)
            if q in ("steps_to_target", "time_to_target_s"):
                cell = "not reached" if r[f"{q}_n"] == 0 else f"{cell} ({r[f'{q}_n']}/{r['n_seeds']})"
            cells.append(cell)
        rows.append(cells)
    parts += [_md_table(header, rows), ""]

    single = bool(pair) and isinstance(pair[0], str)
    pairs = [] if not pair else ([pair] if single else list(pair))
    paireds = [paired] if single else list(paired or [])
    for (a, b), paired in zip(pairs, paireds):
        parts += [f"## Paired differences {a} - {b} (same seed)", ""]
        if paired is None or paired.empty:
            parts += [f"No seed was run with both {a} and {b}.", ""]
        else:
            prow = [
                ([r["setting"] or "-"] if with_setting else [])
                + [
                    r["quantity"],
                    str(r["n_pairs"]),
                    fmt_mean_std(r["mean_diff"], r["std_diff"], digits),
                    ", ".join(f"{s}: {fmt(d, digits)}" for s, d in r["diffs"].items()),
                    f"{r['a_better']}/{r['n_pairs']}",
                ]
                for _, r in paired.iterrows()
            ]
            parts += [
                _md_table(
                    (["setting"] if with_setting else [])
                    + ["quantity", "pairs", f"{a} - {b}", "per seed", f"{a} < {b}"],
                    prow,
                ),
                "",
            ]

    parts += ["## Runs", ""]
    run_q = [(q, h) for q, h in shown if runs[q].notna().any()]
    rrows = [
        [r["optimizer"]]
        + ([r["setting"] or "-"] if with_setting else [])
        + [str(r["seed"])]
        + [fmt(r[q], digits) if not (q == "steps_to_target" and math.isnan(r[q])) else "not reached" for q, _ in run_q]
        + [Path(r["job"]).name]
        for _, r in runs.iterrows()
    ]
    run_header = ["optimizer"] + (["setting"] if with_setting else []) + ["seed"] + [h for _, h in run_q] + ["job"]
    parts += [_md_table(run_header, rrows), ""]
    return "\n".join(parts)


# -------------------------------------------------------------------- plots
def _label(job: Job, with_setting: bool = True) -> str:
    return job.optimizer + (f" ({job.setting})" if job.setting and with_setting else "")


def curves(jobs: list[Job], column: str) -> dict[str, pd.DataFrame]:
    """Per group label: a ``step x seed`` frame of ``column`` (one column per job).

    The label is the optimizer (variant) name, with the setting only where one name has several."""
    settings: dict[str, set[str]] = {}
    for job in jobs:
        settings.setdefault(job.optimizer, set()).add(job.setting)
    with_setting = any(len(v) > 1 for v in settings.values())
    out: dict[str, list[pd.Series]] = {}
    for k, job in enumerate(jobs):
        s = _series(job.metrics, column)
        if s.empty:
            continue
        series = s.drop_duplicates("step", keep="last").set_index("step")["value"].rename(f"{job.seed}#{k}")
        out.setdefault(_label(job, with_setting), []).append(series)
    return {label: pd.concat(series, axis=1).sort_index() for label, series in out.items()}


def plot_curves(jobs: list[Job], column: str, out: Path | str | None = None, ax=None, band: str = "minmax"):
    """Mean over seeds of ``column`` vs step per (optimizer, setting), with a min-max (or ±std) band.

    Draws on ``ax`` when given; else makes a figure (no pyplot: any backend) and saves it to ``out``.
    Returns the figure, or None when no job logged ``column``.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"Invalid band: {band!r} (minmax or std)")
    data = curves(jobs, column)
    if not data:
        return None
    fig = None
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.subplots()
    for label, frame in data.items():
        mean = frame.mean(axis=1)
        if band == "minmax":
            lo, hi = frame.min(axis=1), frame.max(axis=1)
        else:
            std = frame.std(axis=1).fillna(0.0)
            lo, hi = mean - std, mean + std
        steps = frame.index.to_numpy(dtype=float)
        (line,) = ax.plot(steps, mean.to_numpy(), lw=1.5, label=f"{label} (n={frame.shape[1]})")
        if frame.shape[1] > 1:
            ax.fill_between(steps, lo.to_numpy(), hi.to_numpy(), color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    ax.set_title(f"{column}: mean over seeds, band = {'min-max' if band == 'minmax' else '± std'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=120)
    return ax.figure


# ------------------------------------------------------------------- driver
@dataclass
class Summary:
    """What :func:`summarize` produced."""

    runs: pd.DataFrame
    table: pd.DataFrame
    paired: pd.DataFrame | None  # the first pair's table
    markdown: str
    jobs: list[Job]
    common: dict[str, str]
    files: dict[str, Path] = field(default_factory=dict)
    #: every pair's table, keyed by ``(a, b)``
    paired_all: dict[tuple[str, str], pd.DataFrame] = field(default_factory=dict)


PLOTS = {"val_loss.png": "val/loss", "val_acc.png": "val/acc", "sharpness.png": "sharpness/top_eig"}


def _parse_pairs(pair, known: set[str]) -> list[tuple[str, str]]:
    """``"a,b"`` / ``(a, b)`` / a list of those -> a list of checked ``(a, b)``."""
    if pair is None:
        return []
    if isinstance(pair, str):
        items = [pair]
    elif len(pair) == 2 and all(isinstance(x, str) and "," not in x for x in pair):
        items = [tuple(pair)]
    else:
        items = list(pair)
    out = []
    for item in items:
        p = tuple(x.strip() for x in item.split(",")) if isinstance(item, str) else tuple(item)
        if len(p) != 2:
            raise ValueError(f"Invalid pair: {item!r} (expected two optimizer names, 'a,b')")
        for name in p:
            if name not in known:
                raise ValueError(f"Optimizer {name!r} of --pair is not in the sweep ({', '.join(sorted(known))})")
        out.append(p)
    return out


def summarize(
    sweep_dirs: Path | str | Sequence[Path | str],
    metric: str = "val/loss",
    target: float | None = None,
    out: Path | str | None = None,
    pair: str | Sequence[str] | Sequence[str | Sequence[str]] | None = None,
    mode: str | None = None,
    band: str = "minmax",
    digits: int = 4,
    write: bool = True,
) -> Summary:
    """Load the sweep(s), build the tables, write ``summary.md`` and the PNGs to ``out``.

    ``out`` defaults to the (first) sweep folder. ``pair``: ``"a,b"`` or ``(a, b)``, or a list of
    such pairs (one paired table each). Plots:
    ``val_loss.png``, and ``val_acc.png`` / ``sharpness.png`` / ``<metric>.png`` when logged.
    """
    runs, jobs, common = load_runs(sweep_dirs, metric, target, mode)
    table = aggregate(runs)
    pairs = _parse_pairs(pair, set(runs["optimizer"]))
    paired_all = {p: paired_differences(runs, *p, metric=metric) for p in pairs}
    paired = paired_all[pairs[0]] if pairs else None
    first = [sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else list(sweep_dirs)
    title = "Sweep summary: " + ", ".join(shown_path(d) for d in first)
    md = to_markdown(table, runs, list(paired_all.values()), metric, target, title, common, pairs, digits, mode)
    summary = Summary(runs, table, paired, md, jobs, common, paired_all=paired_all)
    if write:
        out_dir = Path(out) if out is not None else Path(first[0])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.md").write_text(md)
        summary.files["summary.md"] = out_dir / "summary.md"
        plots = dict(PLOTS)
        if metric not in plots.values():
            plots[metric.replace("/", "_") + ".png"] = metric
        for name, column in plots.items():
            if plot_curves(jobs, column, out_dir / name, band=band) is not None:
                summary.files[name] = out_dir / name
    return summary


def main(argv: list[str] | None = None) -> Summary:
    parser = argparse.ArgumentParser(
        description="Summarize a Hydra multirun of src/train.py: Markdown table (summary.md) and plots."
    )
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun folder(s) (or single run folders)")
    parser.add_argument("--metric", default="val/loss", help="metric for best/final, target and pairs")
    parser.add_argument("--mode", choices=("min", "max"), default=None, help="default: max if 'acc' in metric")
    parser.add_argument("--target", type=float, default=None, help="report steps/time until metric reaches this")
    parser.add_argument(
        "--pair",
        action="append",
        default=None,
        help="two optimizers 'a,b' for a paired per-seed a - b table (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first sweep folder)")
    parser.add_argument("--band", choices=("minmax", "std"), default="minmax", help="band around the mean curve")
    parser.add_argument("--digits", type=int, default=4, help="significant digits in the tables")
    args = parser.parse_args(argv)
    summary = summarize(
        args.sweep_dirs, args.metric, args.target, args.out, args.pair, args.mode, args.band, args.digits
    )
    print(summary.markdown)
    for path in summary.files.values():
        print(f"wrote {path}")
    return summary
