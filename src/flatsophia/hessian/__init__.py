"""Diagonal-Hessian estimators that produce what the Sophia-family optimizers consume.

Both are plain PyTorch (no Lightning) and share one call signature::

    estimates = estimator(forward, loss_fn, params)

where ``forward()`` returns the model's output (logits), ``loss_fn(output)`` the scalar training
loss, and ``params`` the list from ``optimizer.hessian_params()``. The result has one tensor (or
``None`` for a parameter the loss does not reach) per parameter, ready for
``optimizer.update_hessian(estimates)``. Each estimator owns an explicit ``torch.Generator`` whose
state is part of its ``state_dict()``, so a resumed run draws the same probes.

:class:`HessianRefresher` runs an estimator on schedule inside any training loop (the estimator the
optimizer needs, every k steps or at random, averaged across ranks, checkpointable).
"""

from .base import HessianEstimator, build_estimator
from .gnb import GaussNewtonBartlett
from .hutchinson import Hutchinson
from .refresh import HessianRefresher, distributed_mean

__all__ = [
    "HessianEstimator",
    "Hutchinson",
    "GaussNewtonBartlett",
    "HessianRefresher",
    "build_estimator",
    "distributed_mean",
]
