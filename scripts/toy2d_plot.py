"""Draw GD, sign-GD, Newton and Sophia on the Sophia paper's 2-D toy problem (Fig. 2).

Usage::

    python scripts/toy2d_plot.py [--out toy2d.png] [--steps 40] [--start 0.25 0.5]

The trajectories come from :mod:`flatsophia.experiments.toy2d`; this script only draws them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from flatsophia.experiments import toy2d  # noqa: E402

COLORS = {"GD": "tab:blue", "SignGD (Adam-like)": "tab:orange", "Newton": "tab:red", "Sophia": "tab:green"}


def plot(out: str | Path, start=toy2d.DEFAULT_START, steps: int = toy2d.DEFAULT_STEPS) -> Path:
    """Write the contour map with the four trajectories to ``out`` (PNG) and return its path."""
    trajs = toy2d.run_all(start, steps)
    xs = torch.linspace(-1.0, 1.6, 200, dtype=torch.float64)
    ys = torch.linspace(-0.5, 5.0, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    z = toy2d.loss(torch.stack([gx, gy], dim=-1))

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    levels = torch.logspace(-2, 1.6, 25).tolist()
    ax.contour(gx.numpy(), gy.numpy(), z.numpy(), levels=levels, cmap="Greys", linewidths=0.6)
    for name, traj in trajs.items():
        t = traj.numpy()
        ax.plot(
            t[:, 0], t[:, 1], "o-", ms=2.5, lw=1.2, color=COLORS.get(name), label=f"{name} ({steps} steps)"
        )
    ax.plot(*toy2d.GLOBAL_MIN, "k*", ms=12, label="global min (1, 4)")
    ax.plot(*toy2d.SADDLE, "kx", ms=9, label="saddle (0, 4)")
    ax.plot(*start, "ks", ms=5, label="start")
    ax.set_xlabel(r"$\theta_{[1]}$ (sharp, non-convex $L_1$)")
    ax.set_ylabel(r"$\theta_{[2]}$ (flat $L_2$)")
    ax.set_title(r"$L = 8(x-1)^2(1.3x^2+2x+1) + \frac{1}{2}(y-4)^2$")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="toy2d.png", help="PNG file to write")
    parser.add_argument("--steps", type=int, default=toy2d.DEFAULT_STEPS)
    parser.add_argument("--start", type=float, nargs=2, default=list(toy2d.DEFAULT_START), metavar=("X", "Y"))
    args = parser.parse_args(argv)
    path = plot(args.out, tuple(args.start), args.steps)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
