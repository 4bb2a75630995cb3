"""The two-dimensional toy problem of the Sophia paper (Liu et al. 2023, arXiv:2305.14342, Fig. 2).

.. math::
    L(x, y) = L_1(x) + L_2(y), \\qquad L_1(x) = 8(x-1)^2(1.3x^2 + 2x + 1), \\qquad
    L_2(y) = \\tfrac12 (y-4)^2

:math:`L_1` is sharp and non-convex, :math:`L_2` flat and convex. The global minimum is
:math:`(1, 4)`; :math:`L_1' (x) = 8x(x-1)(5.2x + 3.4)` also vanishes at ``x = 0`` (a local maximum
of :math:`L_1`, so ``(0, 4)`` is a saddle of :math:`L`) and at ``x = -17/26`` (a local minimum of
:math:`L_1`).

Everything here is a small pure function on float64 tensors of shape ``(2,)``: the exact loss,
gradient and (diagonal) Hessian, and four optimizers that return their whole trajectory as a
``(steps + 1, 2)`` tensor. :data:`DEFAULT_START` and the ``*_KWARGS`` settings reproduce the
paper's qualitative picture (checked by ``tests/optim/test_toy2d.py``):

* GD is stable only for ``lr < 2 / L_1''(1)``, so it crawls along the flat ``y`` direction;
* sign-GD (Adam without its EMAs) takes equal steps in both directions and keeps bouncing in ``x``;
* Newton converges to the saddle ``(0, 4)`` because :math:`L_1'' < 0` there and it happily
  follows negative curvature;
* Sophia (positive part of the Hessian, clipped update) walks downhill through the non-convex
  region and converges to ``(1, 4)``.

``scripts/toy2d_plot.py`` draws the four trajectories on the contour map.
"""

from __future__ import annotations

import torch

__all__ = [
    "GLOBAL_MIN",
    "SADDLE",
    "LOCAL_MIN_X",
    "DEFAULT_START",
    "DEFAULT_STEPS",
    "GD_KWARGS",
    "SIGN_GD_KWARGS",
    "NEWTON_KWARGS",
    "SOPHIA_KWARGS",
    "loss",
    "gradient",
    "hessian",
    "hessian_diag",
    "gd",
    "sign_gd",
    "newton",
    "sophia",
    "run_all",
]

DTYPE = torch.float64

#: The global minimum of L.
GLOBAL_MIN = (1.0, 4.0)
#: The other stationary point Newton is attracted to from :data:`DEFAULT_START` (a saddle of L).
SADDLE = (0.0, 4.0)
#: x of the non-global local minimum of L1.
LOCAL_MIN_X = -17.0 / 26.0

#: Start point of the demonstration: inside the region where L1'' < 0 (-0.366 < x < 0.596).
DEFAULT_START = (0.25, 0.5)
#: Number of steps every optimizer takes in the demonstration.
DEFAULT_STEPS = 40

#: GD: ``lr`` just below the stability limit ``2 / L1''(1) = 2 / 68.8`` of the sharp direction.
GD_KWARGS = {"lr": 0.025}
#: sign-GD: step ``lr`` per coordinate; reaches y = 4 in 40 steps but bounces in x.
SIGN_GD_KWARGS = {"lr": 0.1}
#: Newton: plain (undamped) Newton steps with the exact Hessian.
NEWTON_KWARGS = {"lr": 1.0}
#: Sophia: ``lr * clip(g / max(gamma * h, eps), 1)`` with the exact Hessian refreshed every step;
#: with ``lr == gamma`` the unclipped update is exactly a Newton step.
SOPHIA_KWARGS = {"lr": 0.2, "gamma": 0.2, "eps": 1e-12, "hessian_every": 1}


def _xy(point) -> torch.Tensor:
    t = torch.as_tensor(point, dtype=DTYPE)
    if t.shape != (2,):
        raise ValueError(f"Expected a point (x, y), got shape {tuple(t.shape)}")
    return t.clone()


def loss(point) -> torch.Tensor:
    """``L(x, y)``; ``point`` may be any tensor shaped ``(..., 2)`` (a grid for contour plots)."""
    p = torch.as_tensor(point, dtype=DTYPE)
    x, y = p[..., 0], p[..., 1]
    return 8 * (x - 1) ** 2 * (1.3 * x**2 + 2 * x + 1) + 0.5 * (y - 4) ** 2


def gradient(point) -> torch.Tensor:
    """Exact gradient ``(L1'(x), L2'(y))`` with ``L1'(x) = 8x(x-1)(5.2x+3.4)``."""
    x, y = _xy(point).unbind()
    return torch.stack([8 * x * (x - 1) * (5.2 * x + 3.4), y - 4])


def hessian_diag(point) -> torch.Tensor:
    """Exact Hessian diagonal ``(L1''(x), 1)`` with ``L1''(x) = 8(15.6x^2 - 3.6x - 3.4)``."""
    x, _ = _xy(point).unbind()
    return torch.stack([8 * (15.6 * x**2 - 3.6 * x - 3.4), torch.ones((), dtype=DTYPE)])


def hessian(point) -> torch.Tensor:
    """Exact 2x2 Hessian (diagonal: the problem is separable)."""
    return torch.diag(hessian_diag(point))


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"Invalid steps: {steps!r} (expected an integer >= 0)")


def gd(start=DEFAULT_START, steps: int = DEFAULT_STEPS, lr: float = GD_KWARGS["lr"]) -> torch.Tensor:
    """Gradient descent ``theta -= lr * g``; returns the ``(steps + 1, 2)`` trajectory."""
    _check_steps(steps)
    theta = _xy(start)
    traj = [theta.clone()]
    for _ in range(steps):
        theta = theta - lr * gradient(theta)
        traj.append(theta.clone())
    return torch.stack(traj)


def sign_gd(
    start=DEFAULT_START, steps: int = DEFAULT_STEPS, lr: float = SIGN_GD_KWARGS["lr"]
) -> torch.Tensor:
    """Sign gradient descent ``theta -= lr * sign(g)`` (Adam without EMAs and epsilon)."""
    _check_steps(steps)
    theta = _xy(start)
    traj = [theta.clone()]
    for _ in range(steps):
        theta = theta - lr * torch.sign(gradient(theta))
        traj.append(theta.clone())
    return torch.stack(traj)


def newton(start=DEFAULT_START, steps: int = DEFAULT_STEPS, lr: float = NEWTON_KWARGS["lr"]) -> torch.Tensor:
    """Newton's method ``theta -= lr * H^{-1} g`` with the exact (indefinite) Hessian."""
    _check_steps(steps)
    theta = _xy(start)
    traj = [theta.clone()]
    for _ in range(steps):
        theta = theta - lr * torch.linalg.solve(hessian(theta), gradient(theta))
        traj.append(theta.clone())
    return torch.stack(traj)


def sophia(
    start=DEFAULT_START,
    steps: int = DEFAULT_STEPS,
    lr: float = SOPHIA_KWARGS["lr"],
    gamma: float = SOPHIA_KWARGS["gamma"],
    eps: float = SOPHIA_KWARGS["eps"],
    hessian_every: int = SOPHIA_KWARGS["hessian_every"],
    beta1: float = 0.0,
    beta2: float = 0.0,
    clip: float = 1.0,
) -> torch.Tensor:
    """Sophia with the exact diagonal Hessian.

    ``m = beta1 m + (1 - beta1) g``; every ``hessian_every`` steps (starting with the first)
    ``h = beta2 h + (1 - beta2) diag(H)``; then
    ``theta -= lr * clip(m / max(gamma * h, eps), -clip, clip)``. Where ``h <= 0`` the denominator
    is ``eps``, so the step is ``lr * clip`` downhill along ``m``. The defaults (no EMAs, refresh
    every step) are the paper's idealised deterministic Sophia.
    """
    _check_steps(steps)
    if not isinstance(hessian_every, int) or hessian_every < 1:
        raise ValueError(f"Invalid hessian_every: {hessian_every!r} (expected an integer >= 1)")
    theta = _xy(start)
    m = torch.zeros(2, dtype=DTYPE)
    h = torch.zeros(2, dtype=DTYPE)
    traj = [theta.clone()]
    for t in range(steps):
        m = beta1 * m + (1 - beta1) * gradient(theta)
        if t % hessian_every == 0:
            h = beta2 * h + (1 - beta2) * hessian_diag(theta)
        u = (m / torch.clamp(gamma * h, min=eps)).clamp(-clip, clip)
        theta = theta - lr * u
        traj.append(theta.clone())
    return torch.stack(traj)


def run_all(start=DEFAULT_START, steps: int = DEFAULT_STEPS) -> dict[str, torch.Tensor]:
    """The four demonstration trajectories with their default settings, keyed by name."""
    return {
        "GD": gd(start, steps, **GD_KWARGS),
        "SignGD (Adam-like)": sign_gd(start, steps, **SIGN_GD_KWARGS),
        "Newton": newton(start, steps, **NEWTON_KWARGS),
        "Sophia": sophia(start, steps, **SOPHIA_KWARGS),
    }
