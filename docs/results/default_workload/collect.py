"""Collect the default workload's tuning trials and seed runs (see commands.txt) into tuning.csv and runs.csv.

    python docs/results/default_workload/collect.py logs/tune logs/default_workload_seeds

``logs/tune/<optimizer>/<trial>/`` holds one Optuna (QMC) sweep per optimizer; the seed sweep holds one
job per optimizer x seed. Per job: the searched or set hyperparameters (from .hydra/overrides.yaml),
the last logged value of each metric (csv/version_0/metrics.csv) and the job's wall time (first and
last line of its train.log). Tuning rows carry validation metrics only: trials are chosen by
val/loss_best, and the tuning seed's test scores are not looked at.
"""

from __future__ import annotations

import csv
import datetime as dt
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def last_values(job: Path) -> dict[str, float]:
    (table,) = job.glob("csv/version_*/metrics.csv")
    out: dict[str, float] = {}
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def minutes(job: Path) -> float:
    lines = [ln for ln in (job / "train.log").read_text().splitlines() if ln.startswith("[20")]
    stamp = [dt.datetime.strptime(ln[1:24], "%Y-%m-%d %H:%M:%S,%f") for ln in (lines[0], lines[-1])]
    return (stamp[1] - stamp[0]).total_seconds() / 60


def overrides(job: Path) -> dict[str, str]:
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in items)


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def collect_tuning(root: Path) -> list[dict]:
    rows = []
    for sweep in sorted(p for p in root.iterdir() if p.is_dir()):
        best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
        for job in jobs(sweep):
            given = overrides(job)
            params = {k: v for k, v in given.items() if k.startswith("optimizer.")}
            m = last_values(job)
            rows.append(
                {
                    "optimizer": sweep.name,
                    "trial": int(job.name),
                    "seed": given.get("seed"),
                    "params": " ".join(f"{k.split('.', 1)[1]}={float(v):.4g}" for k, v in sorted(params.items())),
                    "val_loss_best": round(m["val/loss_best"], 4),
                    "val_acc_best": round(m["val/acc_best"], 4),
                    "chosen": {k: float(v) for k, v in params.items()}
                    == {k: float(v) for k, v in best["best_params"].items()},
                    "minutes": round(minutes(job), 2),
                }
            )
    return rows


def collect_seeds(sweep: Path) -> list[dict]:
    rows = []
    for job in jobs(sweep):
        given = overrides(job)
        m = last_values(job)
        rows.append(
            {
                "optimizer": given["optimizer"],
                "seed": int(given["seed"]),
                "test_acc": round(m["test/acc"], 4),
                "test_loss": round(m["test/loss"], 4),
                "val_loss_best": round(m["val/loss_best"], 4),
                "minutes": round(minutes(job), 2),
            }
        )
    return rows


def write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def table(rows: list[dict]) -> str:
    out = ["| optimizer | test acc (mean ± std, 3 seeds) | minutes per run |", "|---|---|---|"]
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        acc = [r["test_acc"] for r in rows if r["optimizer"] == name]
        mins = [r["minutes"] for r in rows if r["optimizer"] == name]
        out.append(f"| {name} | {statistics.mean(acc):.3f} ± {statistics.stdev(acc):.3f} | {statistics.mean(mins):.1f} |")
    return "\n".join(out)


if __name__ == "__main__":
    tuning, seeds = collect_tuning(Path(sys.argv[1])), collect_seeds(Path(sys.argv[2]))
    write(HERE / "tuning.csv", tuning)
    write(HERE / "runs.csv", seeds)
    print(table(seeds))
    print(f"CPU minutes: tuning {sum(r['minutes'] for r in tuning):.1f}, seeds {sum(r['minutes'] for r in seeds):.1f}")
