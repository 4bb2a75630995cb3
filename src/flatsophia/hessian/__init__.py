"""Diagonal-Hessian estimators that produce what the Sophia-family optimizers consume.

Both are plain PyTorch (no Lightning) and share one call signature::

    estimates = estimator(forward, loss_fn, params)

where ``forward()`` returns the model's output (logits), ``loss_fn(output)`` the scalar training
loss, and ``params`` the list from ``optimizer.hessian_params()``. The result has one tensor (or
``None`` for a parameter the loss does not reach) per parameter, ready for
``optimizer.update_hessian(estimates)``. Each estimator owns an explicit ``torch.Generator`` whose
state is part of its ``state_dict()``, so a resumed run draws the same probes.
"""

from .base import HessianEstimator, build_estimator
from .gnb import GaussNewtonBartlett
from .hutchinson import Hutchinson

__all__ = ["HessianEstimator", "Hutchinson", "GaussNewtonBartlett", "build_estimator"]
