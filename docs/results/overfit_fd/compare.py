"""Paired per-seed comparison of FlatSophia's two Hessian-vector products on the overfit study.

    python docs/results/overfit_fd/compare.py docs/results/overfit_fd/runs.csv

Compares the runs in runs.csv (hvp = finite_difference | autograd, seeds 0-4) with each other and with
the published CPU runs of the study (docs/results/overfit_cpu/runs.csv, optimizer flat_sophia).
"""

import sys
from pathlib import Path

import pandas as pd

COLS = ["val_loss_best", "val_loss_final", "val_loss_rise", "test_loss", "test_final_loss", "test_final_acc"]

here = Path(__file__).resolve().parent
new = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else here / "runs.csv")
pub = pd.read_csv(here.parent / "overfit_cpu" / "runs.csv")
groups = {
    "published (CPU)": pub[pub.optimizer == "flat_sophia"].set_index("seed").sort_index(),
    **{f"hvp={h}": new[new.hvp == h].set_index("seed").sort_index() for h in ("finite_difference", "autograd")},
}

print("| runs (seeds 0-4) | " + " | ".join(COLS) + " |")
print("|---" * (len(COLS) + 1) + "|")
for name, df in groups.items():
    print(f"| {name} | " + " | ".join(f"{df[c].mean():.3f} ± {df[c].std():.3f}" for c in COLS) + " |")


def paired(a: str, b: str) -> None:
    print(f"\n{a} - {b}, per seed:\n")
    print("| quantity | mean ± std | per seed (0..4) | first lower |")
    print("|---|---|---|---|")
    for c in COLS:
        d = groups[a][c] - groups[b][c]
        print(f"| {c} | {d.mean():+.3f} ± {d.std():.3f} | {', '.join(f'{x:+.3f}' for x in d)} | {(d < 0).sum()}/{len(d)} |")


paired("hvp=finite_difference", "published (CPU)")
paired("hvp=autograd", "published (CPU)")
paired("hvp=finite_difference", "hvp=autograd")
