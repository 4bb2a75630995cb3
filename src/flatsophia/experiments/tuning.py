"""Quasi-random hyperparameter search for the Optuna sweeper (AlgoPerf-style fair tuning).

MLCommons AlgoPerf's external tuning ruleset gives every training algorithm the same small budget
of trials drawn quasi-randomly from the search space that algorithm declares. Optuna >= 3 ships a
``QMCSampler``, but Hydra's Optuna sweeper (``hydra-optuna-sweeper`` 1.2/1.3) requires Optuna < 3,
so this module provides the same behaviour for Optuna 2.x (and works with 3.x): trial ``n`` takes
the ``n``-th point of a scrambled Halton sequence (``scipy.stats.qmc.Halton``), one dimension per
hyperparameter in the order the sweeper first asks for them, mapped onto each distribution
(log-uniform on the log scale, integers rounded, categorical by equal bins).

The points depend only on ``seed`` and the trial number, not on earlier results, so trials that
run in parallel batches are the same as trials run one after another.

Use from a config::

    hydra:
      sweeper:
        sampler:
          _target_: flatsophia.experiments.tuning.QMCSampler
          seed: 0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from optuna.samplers import BaseSampler
from scipy.stats import qmc

__all__ = ["QMCSampler", "unit_to_value"]


def unit_to_value(u: float, distribution: Any) -> Any:
    """Map ``u`` in [0, 1) onto an Optuna distribution (any of Optuna 2.x's or 3.x's kinds)."""
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must lie in [0, 1), got {u}")
    choices = getattr(distribution, "choices", None)
    if choices is not None:
        return choices[min(int(u * len(choices)), len(choices) - 1)]
    low, high = float(distribution.low), float(distribution.high)
    log = bool(getattr(distribution, "log", False)) or type(distribution).__name__ in (
        "LogUniformDistribution",
        "IntLogUniformDistribution",
    )
    step = getattr(distribution, "step", None)
    if step is None:
        step = getattr(distribution, "q", None)
    is_int = type(distribution).__name__.startswith("Int")
    if is_int and log:
        # Equal probability per integer on the log scale: sample on [low-0.5, high+0.5] in log space.
        lo, hi = math.log(low - 0.5 if low > 0.5 else low), math.log(high + 0.5)
        value = round(math.exp(lo + u * (hi - lo)))
        return int(min(max(value, low), high))
    if is_int:
        step = int(step or 1)
        n = int((high - low) // step) + 1
        return int(low + min(int(u * n), n - 1) * step)
    if log:
        value = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
    elif step is not None:
        n = int(round((high - low) / step)) + 1
        value = low + min(int(u * n), n - 1) * step
    else:
        value = low + u * (high - low)
    return float(min(max(value, low), high))


class QMCSampler(BaseSampler):
    """Trial ``n`` = point ``n`` of a scrambled Halton sequence, one dimension per hyperparameter.

    Args:
        seed: seed of the scrambling (``None``: unseeded, not reproducible).
        scramble: scramble the sequence (Owen scrambling; the unscrambled first point is the
            origin, i.e. every hyperparameter at its lower bound).
        max_dims: the most hyperparameters one study may search.
        max_trials: the most trials one study may run.
    """

    def __init__(self, seed: int | None = 0, scramble: bool = True, max_dims: int = 16, max_trials: int = 4096):
        if max_dims < 1:
            raise ValueError(f"max_dims must be >= 1, got {max_dims}")
        if max_trials < 1:
            raise ValueError(f"max_trials must be >= 1, got {max_trials}")
        self.seed, self.scramble, self.max_dims, self.max_trials = seed, scramble, max_dims, max_trials
        # Point n is the same whatever the number of points drawn: draw them all once.
        self._points = qmc.Halton(d=max_dims, scramble=scramble, seed=seed).random(max_trials)
        self._dims: dict[str, int] = {}

    def reseed_rng(self) -> None:  # the points are fixed by `seed`; nothing random is left
        pass

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def point(self, number: int) -> np.ndarray:
        """The unit-cube point of trial ``number`` (all ``max_dims`` coordinates)."""
        if not 0 <= number < self.max_trials:
            raise ValueError(f"trial number {number} outside [0, {self.max_trials}); raise max_trials")
        return self._points[number]

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name not in self._dims:
            if len(self._dims) >= self.max_dims:
                raise ValueError(
                    f"QMCSampler(max_dims={self.max_dims}) got a {len(self._dims) + 1}th hyperparameter "
                    f"{param_name!r}; raise max_dims"
                )
            self._dims[param_name] = len(self._dims)
        return unit_to_value(float(self.point(trial.number)[self._dims[param_name]]), param_distribution)
