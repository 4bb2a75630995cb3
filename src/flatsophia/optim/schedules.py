"""Learning-rate schedules as plain ``torch.optim.lr_scheduler.LambdaLR`` factories.

``warmup_decay`` covers the schedules the experiments need: constant, linear warmup then cosine
decay, and linear warmup then linear decay to zero (the FlatSophia reference experiment).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(
    step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps.

    Linear warmup from 0 over ``warmup_steps``, then ``decay`` (``"constant"``, ``"cosine"`` or
    ``"linear"``) from 1 down to ``min_lr_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def warmup_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` following :func:`lr_factor`; step it once per optimizer step."""
    if decay not in SCHEDULES:
        raise ValueError(f"Invalid schedule {decay!r}; choose one of: {', '.join(SCHEDULES)}")
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (expected an integer >= 1)")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an integer >= 0)")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"Invalid min_lr_ratio: {min_lr_ratio!r} (expected a number in [0, 1])")
    return LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, decay, min_lr_ratio))
