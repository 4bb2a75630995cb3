"""How much of FlatSophia's sharpness mask is probe noise?

At fixed weights, draw two independent Hutchinson estimates, build the top-``sharp_fraction`` mask
from each (the reference rule: strict ``>`` at the k-th largest |d| over all parameters), and report
their overlap |M1 & M2| / |M1|. Chance level is ``sharp_fraction``; 1.0 means the mask is fully
determined by the weights. Variants: Gaussian vs Rademacher probes, and several probes averaged.

    python scripts/mask_overlap.py --steps 200 --pairs 5

The weights come from a short AdamW run of the default model (ViT1D on MNIST-1D) so the curvature
is not that of the initialisation only.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from flatsophia.data.mnist1d_datamodule import MNIST1DDataModule
from flatsophia.hessian import Hutchinson
from flatsophia.models.components.vit1d import ViT1D


def top_mask(estimates: list[torch.Tensor], fraction: float) -> torch.Tensor:
    flat = torch.cat([e.reshape(-1).abs() for e in estimates])
    k = int(fraction * flat.numel())
    tau = flat.kthvalue(flat.numel() - k + 1).values
    return flat > tau


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="AdamW steps before measuring")
    ap.add_argument("--pairs", type=int, default=5, help="independent probe pairs per variant")
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data-dir", default="data")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    dm = MNIST1DDataModule(data_dir=args.data_dir, batch_size=64)
    dm.setup("fit")
    model = ViT1D(num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(args.steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = next(iter(dm.val_dataloader()))
    x, y = x[: args.batch], y[: args.batch]
    params = [p for p in model.parameters() if p.requires_grad]

    def masks(distribution: str, n_probes: int, seed: int) -> torch.Tensor:
        est = Hutchinson(distribution=distribution, n_probes=n_probes, seed=seed)
        d = est(lambda: model(x), lambda out: F.cross_entropy(out, y), params)
        return top_mask([e for e in d if e is not None], args.fraction)

    results = {}
    for distribution, n_probes in [("gaussian", 1), ("rademacher", 1), ("gaussian", 4), ("rademacher", 4)]:
        overlaps = []
        for i in range(args.pairs):
            m1, m2 = masks(distribution, n_probes, 2 * i), masks(distribution, n_probes, 2 * i + 1)
            overlaps.append((m1 & m2).sum().item() / m1.sum().item())
        key = f"{distribution} x{n_probes}"
        results[key] = overlaps
        print(
            f"{key:14s} overlap {statistics.mean(overlaps):.3f} +- {statistics.stdev(overlaps):.3f} "
            f"(chance {args.fraction:.2f}; {args.pairs} pairs)"
        )
    return results


if __name__ == "__main__":
    main()
