"""How noisy is the diagonal-Hessian estimate when a refresh sees only part of the batch?

A refresh with ``batch_fraction = f`` estimates on the first ``ceil(f * B)`` examples of the batch.
Both estimators stay unbiased (Hutchinson's ``v * (H v)`` of the subset's mean loss, and
Gauss-Newton-Bartlett's ``n * ghat**2`` with ``n`` the subset's number of predictions), so a smaller
subset adds noise and no bias. This measures how much, on a fixed model, on CPU::

    python scripts/estimate_noise.py --out docs/results/batch_fraction

The model is the ``experiment=sophia_charlm`` GPT (4 layers, width 128, 16 windows of 128 bytes of
the embedded corpus per batch) after ``--warm`` AdamW steps. For each ``f`` and estimator, ``--draws``
estimates are taken, each on a fresh random batch with a fresh probe (or fresh sampled labels), as
training draws them. ``D`` is the mean of every estimate of that estimator (all ``f`` pooled: the
common expectation). Reported per ``f``:

- ``noise_1``: ``sqrt(mean ||d - D||^2) / ||D||``, one estimate's relative error;
- ``noise_ema``: ``noise_1 * sqrt((1 - beta2) / (1 + beta2))`` with Sophia's ``beta2 = 0.99``: the
  relative error left in the optimizer's exponential average of independent estimates (0.071 x);
- ``bias``: ``||mean_f - D|| / ||D||`` next to ``bias_se`` = ``noise_1 / sqrt(draws)`` (the size
  it would have by chance): a subset's estimate must not drift from the full batch's;
- ``seconds``: the median time of one estimate, and ``cost`` = that over the ``f = 1`` time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flatsophia.commandline import shown_command
from flatsophia.hessian.gnb import GaussNewtonBartlett
from flatsophia.hessian.hutchinson import Hutchinson
from flatsophia.hessian.subset import subset_size
from flatsophia.models.components.gpt import GPT

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
ESTIMATORS = ("hutchinson", "gnb")
BETA2 = 0.99
EMA = math.sqrt((1 - BETA2) / (1 + BETA2))


class CharLMProblem:
    """The charlm GPT and a sampler of random training batches from the embedded corpus."""

    def __init__(self, seed: int = 0, batch_size: int = 16, block_size: int = 128, warm: int = 200):
        from flatsophia.data.charlm_datamodule import VOCAB_SIZE, encode, stdlib_corpus

        torch.manual_seed(seed)
        self.data = encode(stdlib_corpus(1_000_000))
        self.batch_size, self.block_size = batch_size, block_size
        self.model = GPT(vocab_size=VOCAB_SIZE, block_size=block_size, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
        self.gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        for _ in range(warm):
            x, y = self.batch()
            loss = self.loss(self.model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(self.data) - self.block_size - 1, (self.batch_size,), generator=self.gen)
        rows = torch.stack([self.data[s : s + self.block_size + 1] for s in start.tolist()])
        return rows[:, :-1], rows[:, 1:]

    @staticmethod
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def estimate(problem: CharLMProblem, name: str, estimator, fraction: float) -> tuple[torch.Tensor, float]:
    """One estimate on the first ``ceil(f * B)`` rows of a fresh batch, flattened; and its seconds."""
    x, y = problem.batch()
    n = subset_size(fraction, len(x))
    x, y = x[:n], y[:n]
    start = time.perf_counter()
    out = estimator(lambda: problem.model(x), lambda logits: problem.loss(logits, y), problem.params)
    seconds = time.perf_counter() - start
    flat = torch.cat([(torch.zeros_like(p) if d is None else d).reshape(-1) for p, d in zip(problem.params, out)])
    flat = flat.double()
    if name == "gnb":
        flat = flat.square() * y.numel()  # Sophia-G's bs * ghat**2, bs = the subset's predictions
    return flat, seconds


def measure(problem: CharLMProblem, draws: int = 48, fractions=FRACTIONS, seed: int = 0) -> dict:
    results = {}
    for name in ESTIMATORS:
        est = Hutchinson(seed=seed, hvp="autograd") if name == "hutchinson" else GaussNewtonBartlett(seed=seed)
        samples, times = {}, {}
        for f in fractions:
            runs = [estimate(problem, name, est, f) for _ in range(draws)]
            samples[f] = torch.stack([d for d, _ in runs])
            times[f] = statistics.median(s for _, s in runs)
        pooled = torch.cat(list(samples.values())).mean(0)
        norm = float(pooled.norm())
        rows = {}
        for f in fractions:
            s = samples[f]
            noise = math.sqrt(float((s - pooled).square().sum(1).mean())) / norm
            rows[str(f)] = {
                "rows": subset_size(f, problem.batch_size),
                "noise_1": noise,
                "noise_ema": noise * EMA,
                "bias": float((s.mean(0) - pooled).norm()) / norm,
                "bias_se": noise / math.sqrt(draws),
                "seconds": times[f],
                "cost": times[f] / times[fractions[0]],
            }
        results[name] = rows
    return results


def markdown(results: dict, draws: int) -> str:
    lines = [
        f"Relative error of one diagonal-Hessian estimate against the mean of all ({draws} draws per row), "
        "charlm GPT, CPU.",
        "",
        "| estimator | f | rows | one estimate | in the EMA (beta2 0.99) | bias (chance level) | time (x f=1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        for f, r in rows.items():
            lines.append(
                f"| {name} | {float(f):g} | {r['rows']} | {r['noise_1']:.2f} | {r['noise_ema']:.3f} | "
                f"{r['bias']:.3f} ({r['bias_se']:.3f}) | {r['cost']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=48, help="estimates per estimator and fraction")
    parser.add_argument("--warm", type=int, default=200, help="AdamW steps before measuring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    problem = CharLMProblem(seed=args.seed, warm=args.warm)
    results = measure(problem, draws=args.draws, seed=args.seed)
    table = markdown(results, args.draws)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        given = sys.argv[1:] if argv is None else argv
        command = shown_command(["python", "scripts/estimate_noise.py", *map(str, given)])
        (args.out / "results.json").write_text(json.dumps({"command": command, "results": results}, indent=2))
        (args.out / "table.md").write_text(f"Command: `{command}`\n\n{table}")
