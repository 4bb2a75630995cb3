"""A Hessian refresh on part of the batch: the first ``ceil(fraction * B)`` examples.

The estimate feeds an exponential moving average, so estimating on a sample of the batch adds
noise, not bias (the Sophia authors estimate on one micro-batch). These helpers take that sample
from a batch of any nesting (tuples, lists, dicts of tensors, through ``torch.utils._pytree``) and
tell whether a model mixes examples within a batch (BatchNorm in training mode), which decides
whether a training pass may be run in two chunks.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils import _pytree

__all__ = ["subset_size", "batch_size", "split_batch", "batch_statistics_layers"]


def subset_size(fraction: float, n: int) -> int:
    """``ceil(fraction * n)``, at least 1 and at most ``n`` (``fraction * n`` rounded to 9 decimals
    first, so that 0.1 x 30 is 3, not 4)."""
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


def batch_size(batch) -> int:
    """The leading size shared by every tensor of ``batch`` with at least one dimension
    (``ValueError`` when they differ, or when there is none)."""
    sizes = {tuple(t.shape)[:1] for t in _pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.ndim}
    if len(sizes) != 1:
        shapes = [tuple(t.shape) for t in _pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
        raise ValueError(
            f"Cannot take a subset of this batch: its tensors' shapes {shapes} do not share one leading "
            "(batch) dimension; the subset is the first rows of every tensor along dim 0"
        )
    return sizes.pop()[0]


def split_batch(batch, n: int):
    """``(head, tail)``: ``batch`` with every tensor of at least one dimension cut into its first
    ``n`` rows and the rest (views, along dim 0); other leaves, 0-d tensors included, go to both."""

    def cut(rows: slice):
        return _pytree.tree_map(lambda t: t[rows] if isinstance(t, torch.Tensor) and t.ndim else t, batch)

    return cut(slice(None, n)), cut(slice(n, None))


def batch_statistics_layers(model: nn.Module | None) -> list[str]:
    """Names of ``model``'s submodules in training mode that mix the examples of a batch: BatchNorm of
    any kind (SyncBatchNorm and the lazy ones included), and any other module holding a running
    mean or variance. Running such a model on a batch in two chunks changes its output."""
    if model is None:
        return []
    found = []
    for name, m in model.named_modules():
        stats = isinstance(m, nn.modules.batchnorm._BatchNorm) or any(
            getattr(m, b, None) is not None for b in ("running_mean", "running_var")
        )
        if stats and m.training:
            found.append(f"{name} ({type(m).__name__})" if name else type(m).__name__)
    return found
