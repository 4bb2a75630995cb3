"""``fused=True`` inside the training module (manual optimization, Hessian refreshes, Lightning's
optimizer wrapper) gives the run the eager step gives, and logs no fallback."""

from __future__ import annotations

import logging

import _helpers
import pytest
import torch
from _helpers import DumpState, dataset, loader, make_module, trainer

from flatsophia.optim import _fused


def _train(tmp_path, name, fused, monkeypatch):
    monkeypatch.setitem(_helpers.OPT_KWARGS, name, {**_helpers.OPT_KWARGS[name], "fused": fused})
    tmp_path.mkdir(parents=True, exist_ok=True)
    module = make_module(name, dtype=torch.float64)
    t = trainer(tmp_path, callbacks=[DumpState(str(tmp_path))], max_steps=12)
    t.fit(module, loader(dataset(dtype=torch.float64)))
    return torch.load(tmp_path / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("name", ["sophia_g", "flat_sophia"])
def test_module_run_with_fused_step_matches_eager(tmp_path, name, monkeypatch, caplog):
    taken = []
    run = _fused.FusedStep.run

    def counting(self, *args):
        taken.append(run(self, *args))
        return taken[-1]

    monkeypatch.setattr(_fused.FusedStep, "run", counting)
    with caplog.at_level(logging.WARNING, logger="flatsophia.optim._fused"):
        fused = _train(tmp_path / "fused", name, True, monkeypatch)
    assert not [r for r in caplog.records if "fused" in r.getMessage()], caplog.text
    # every step took the C++ step but the one that records diagnostics (log_stats_every=10: step 10, eager)
    assert len(taken) == 11 and all(taken)
    eager = _train(tmp_path / "eager", name, False, monkeypatch)
    assert fused["refreshes"] == eager["refreshes"] > 0
    for key in eager["params"]:
        torch.testing.assert_close(fused["params"][key], eager["params"][key], rtol=1e-10, atol=1e-12)
