"""The Sophia paper's 2-D toy problem: exact derivatives, and what each optimizer does from the
demonstration start point (Sophia reaches (1, 4), Newton the saddle (0, 4), GD crawls along y)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from flatsophia.experiments import toy2d

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[2]


def test_exact_derivatives_match_autograd():
    for point in [(0.25, 0.5), (-1.2, 3.0), (1.0, 4.0), (0.7, -2.0)]:
        xy = torch.tensor(point, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(toy2d.loss(xy), xy)
        torch.testing.assert_close(toy2d.gradient(point), g, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(toy2d.loss(xy), xy, create_graph=True)
        H = torch.stack([torch.autograd.grad(g[i], xy, retain_graph=True)[0] for i in range(2)])
        torch.testing.assert_close(toy2d.hessian(point), H, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(toy2d.hessian_diag(point), H.diagonal(), rtol=1e-12, atol=1e-12)
    grid = torch.zeros(4, 3, 2, dtype=F64)
    assert toy2d.loss(grid).shape == (4, 3)


def test_stationary_points():
    for x in (1.0, 0.0, toy2d.LOCAL_MIN_X):
        assert abs(toy2d.gradient((x, 4.0))[0].item()) < 1e-12
    assert toy2d.loss(toy2d.GLOBAL_MIN).item() == 0.0
    assert toy2d.hessian_diag(toy2d.SADDLE)[0].item() < 0  # a maximum of L1: (0, 4) is a saddle of L
    assert toy2d.hessian_diag((toy2d.LOCAL_MIN_X, 4.0))[0].item() > 0
    # The start point lies where L1 is concave, so the raw Hessian points the wrong way.
    assert toy2d.hessian_diag(toy2d.DEFAULT_START)[0].item() < 0


def _dist(point, target) -> float:
    return float(torch.linalg.vector_norm(point - torch.tensor(target, dtype=F64)))


def test_sophia_reaches_global_minimum():
    traj = toy2d.sophia()
    assert traj.shape == (toy2d.DEFAULT_STEPS + 1, 2) and traj.dtype == F64
    assert torch.equal(traj[0], torch.tensor(toy2d.DEFAULT_START, dtype=F64))
    assert _dist(traj[-1], toy2d.GLOBAL_MIN) < 1e-8
    # Clipping: no coordinate ever moves by more than lr per step.
    assert (traj.diff(dim=0).abs() <= toy2d.SOPHIA_KWARGS["lr"] + 1e-12).all()
    # Refreshing the exact Hessian only every 10 steps, with EMAs, still gets there.
    lazy = toy2d.sophia(hessian_every=10, beta1=0.5, beta2=0.5, steps=120)
    assert _dist(lazy[-1], toy2d.GLOBAL_MIN) < 1e-3


def test_newton_converges_to_the_saddle():
    traj = toy2d.newton()
    assert _dist(traj[-1], toy2d.SADDLE) < 1e-10
    assert _dist(traj[-1], toy2d.GLOBAL_MIN) > 0.9
    assert toy2d.loss(traj[-1]).item() == pytest.approx(8.0)  # L1(0) = 8, not 0


def test_gd_is_slow_along_the_flat_direction():
    traj = toy2d.gd()
    x, y = traj[-1].tolist()
    assert abs(x - 1) < 1e-3  # the sharp direction has converged ...
    assert abs(y - 4) > 1.0  # ... the flat one has not: (1 - lr)^40 of the way is left
    assert y == pytest.approx(4 - (4 - toy2d.DEFAULT_START[1]) * (1 - toy2d.GD_KWARGS["lr"]) ** toy2d.DEFAULT_STEPS)
    # A step size that would fix y is unstable in x: lr > 2 / L1''(1) diverges.
    assert 2 / toy2d.hessian_diag(toy2d.GLOBAL_MIN)[0].item() < 0.03
    diverged = toy2d.gd(steps=30, lr=0.03)
    assert abs(diverged[-1, 0].item() - 1) > abs(diverged[5, 0].item() - 1)


def test_sign_gd_bounces_in_the_sharp_direction():
    traj = toy2d.sign_gd()
    lr = toy2d.SIGN_GD_KWARGS["lr"]
    assert (traj.diff(dim=0).abs() - lr).abs().max() < 1e-12  # every step is exactly +-lr per coordinate
    tail_x = traj[-10:, 0]
    assert (tail_x - 1).abs().min() > 0.01 and (tail_x - 1).abs().max() <= lr  # oscillates around 1
    assert toy2d.loss(traj[-1]).item() > 1e-3 > toy2d.loss(toy2d.sophia()[-1]).item()


def test_run_all_and_bad_arguments():
    trajs = toy2d.run_all()
    assert list(trajs) == ["GD", "SignGD (Adam-like)", "Newton", "Sophia"]
    assert all(t.shape == (toy2d.DEFAULT_STEPS + 1, 2) for t in trajs.values())
    with pytest.raises(ValueError, match="-1"):
        toy2d.gd(steps=-1)
    with pytest.raises(ValueError, match="0"):
        toy2d.sophia(hessian_every=0)
    with pytest.raises(ValueError, match="shape"):
        toy2d.newton(start=(1.0, 2.0, 3.0))


def test_plot_script_writes_png(tmp_path):
    spec = importlib.util.spec_from_file_location("toy2d_plot", ROOT / "scripts" / "toy2d_plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--out", str(tmp_path / "toy.png"), "--steps", "10"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
