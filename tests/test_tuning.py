"""Fair tuning: the QMC sampler and the per-optimizer search spaces of conf/hparams_search/qmc_*.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import optuna
import pytest
import torch
from omegaconf import OmegaConf
from optuna.distributions import (
    CategoricalDistribution,
    IntUniformDistribution,
    LogUniformDistribution,
    UniformDistribution,
)

from flatsophia.experiments.tuning import QMCSampler, unit_to_value

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
QMC_OPTIONS = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("qmc_*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _trials(sampler, n, space):
    study = optuna.create_study(sampler=sampler)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append({name: trial._suggest(name, dist) for name, dist in space.items()})
        study.tell(trial, 0.0)
    return out


SPACE = {
    "lr": LogUniformDistribution(1e-4, 1e-2),
    "frac": UniformDistribution(0.05, 0.5),
    "k": IntUniformDistribution(1, 4),
    "c": CategoricalDistribution(["a", "b", "c"]),
}


def test_trials_are_quasi_random_deterministic_and_in_range():
    a = _trials(QMCSampler(seed=0), 16, SPACE)
    assert a == _trials(QMCSampler(seed=0), 16, SPACE)  # same seed, same trials
    assert a != _trials(QMCSampler(seed=1), 16, SPACE)
    for t in a:
        assert 1e-4 <= t["lr"] <= 1e-2 and 0.05 <= t["frac"] <= 0.5
        assert t["k"] in (1, 2, 3, 4) and t["c"] in ("a", "b", "c")
    # low discrepancy: 16 points put exactly 4 in each quarter of every continuous dimension
    # (Halton in base 2 and 3 is stratified; log-uniform quarters are quarters of log10 lr)
    lr_q = [min(int((math.log10(t["lr"]) + 4) / 2 * 4), 3) for t in a]
    assert sorted(lr_q.count(q) for q in range(4)) == [4, 4, 4, 4]
    # every integer and category is used
    assert {t["k"] for t in a} == {1, 2, 3, 4} and {t["c"] for t in a} == {"a", "b", "c"}


def test_trial_n_does_not_depend_on_the_batching():
    """The sweeper asks for n_jobs trials at a time; the points depend only on the trial number."""
    sampler = QMCSampler(seed=3)
    study = optuna.create_study(sampler=sampler)
    batch = [study.ask() for _ in range(5)]
    values = [t._suggest("lr", SPACE["lr"]) for t in batch]
    one_by_one = [t["lr"] for t in _trials(QMCSampler(seed=3), 5, {"lr": SPACE["lr"]})]
    assert values == pytest.approx(one_by_one, rel=0, abs=0)
    assert values[0] == pytest.approx(10 ** (-4 + 2 * sampler.point(0)[0]))


def test_unit_to_value_edges_and_errors():
    assert unit_to_value(0.0, LogUniformDistribution(1e-4, 1e-2)) == pytest.approx(1e-4)
    assert unit_to_value(0.999999, IntUniformDistribution(1, 4)) == 4
    assert unit_to_value(0.5, CategoricalDistribution([7])) == 7
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\), got 1.0"):
        unit_to_value(1.0, SPACE["lr"])
    with pytest.raises(ValueError, match="max_dims must be >= 1, got 0"):
        QMCSampler(max_dims=0)
    sampler = QMCSampler(max_dims=1)
    with pytest.raises(ValueError, match="got a 2th hyperparameter 'frac'; raise max_dims"):
        _trials(sampler, 1, {"lr": SPACE["lr"], "frac": SPACE["frac"]})
    with pytest.raises(ValueError, match=r"trial number 4 outside \[0, 4\)"):
        QMCSampler(max_trials=4).point(4)


@pytest.mark.parametrize("experiment", ["flat_sophia_overfit", "sophia_charlm"])
@pytest.mark.parametrize("option", QMC_OPTIONS)
def test_search_spaces_compose_and_every_trial_builds_its_optimizer(make_cfg, option, experiment):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    name = option.removeprefix("qmc_")
    cfg = make_cfg([f"experiment={experiment}", f"hparams_search={option}"], tiny=False)
    expected = OmegaConf.load(CONF_DIR / "optimizer" / f"{name}.yaml")._target_
    assert cfg.optimizer._target_ == expected  # the search space selects its optimizer
    sweeper = cfg.hydra.sweeper
    assert sweeper.sampler._target_ == "flatsophia.experiments.tuning.QMCSampler"
    assert (sweeper.n_trials, sweeper.direction) == (5, "minimize")  # the same budget for everyone
    assert cfg.optimized_metric == "val/loss_best"
    assert "optimizer.lr" in sweeper.params
    parser = OverridesParser.create()
    space = {
        key: create_optuna_distribution_from_override(parser.parse_override(f"{key}={value}"))
        for key, value in sweeper.params.items()
    }
    for trial in _trials(QMCSampler(seed=0), 2, space):  # the keys matter, not the number of points
        overrides = [f"{k}={v}" for k, v in trial.items()]
        tcfg = make_cfg([f"experiment={experiment}", f"optimizer={name}", *overrides], tiny=False)
        for key, value in trial.items():
            assert OmegaConf.select(tcfg, key) == pytest.approx(value)
        opt = hydra.utils.instantiate(tcfg.optimizer)([torch.nn.Parameter(torch.zeros(3, 3))])
        assert opt.param_groups[0]["lr"] == pytest.approx(trial["optimizer.lr"])
