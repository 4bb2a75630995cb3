"""scripts/estimate_noise.py's measurement, on a problem whose answer is known: a loss with a
diagonal Hessian, where Hutchinson's ``v * (H v)`` is ``a * v**2`` and a Gaussian probe's relative
error is sqrt(2) per coordinate whatever the batch share."""

from __future__ import annotations

import math

import torch
from torch import nn

from flatsophia.experiments.estimate_noise import EMA, markdown, measure


class DiagonalProblem:
    batch_size = 8

    def __init__(self):
        self.a = torch.linspace(0.5, 4.0, 64)
        self.model = _Rows(64)
        self.params = list(self.model.parameters())

    def batch(self):
        x = torch.zeros(self.batch_size, 1)
        return x, torch.zeros(self.batch_size, dtype=torch.long)

    def loss(self, out, y):
        return 0.5 * (self.a * out[0] ** 2).sum() + 0.0 * out.mean()


class _Rows(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.theta = nn.Parameter(torch.linspace(-1, 1, n))

    def forward(self, x):
        return self.theta.expand(len(x), -1)


def test_hutchinson_noise_is_a_gaussian_probes_on_a_diagonal_hessian():
    results = measure(DiagonalProblem(), draws=200, fractions=(1.0, 0.25))
    rows = results["hutchinson"]
    assert [r["rows"] for r in rows.values()] == [8, 2]
    for r in rows.values():
        # sqrt(sum a_i^2 * 2) / sqrt(sum a_i^2) = sqrt(2), up to the pooled mean's own noise
        assert abs(r["noise_1"] - math.sqrt(2)) < 0.15, r
        assert r["noise_ema"] == r["noise_1"] * EMA
        assert r["bias"] < 4 * r["bias_se"]
    assert rows["1.0"]["cost"] == 1.0
    assert "| hutchinson | 0.25 | 2 |" in markdown(results, 200)
