"""Helpers for parameters sharded across ranks as DTensors (FSDP2, ``torch.distributed.fsdp.fully_shard``).

torch.distributed only (no Lightning). The optimizers and the Hessian estimators work on the local
shard of each DTensor (:func:`local`: the shard itself, sharing storage, so in-place updates land
in the sharded parameter) and reduce the few global quantities they need (norms, counts, the
non-finite flag, FlatSophia's threshold) with scalar all-reduces over :func:`shard_group`. Nothing
here gathers a full parameter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "all_reduce_sum",
    "any_dtensor",
    "fully_shard_blocks",
    "global_norm",
    "is_dtensor",
    "local",
    "local_shard",
    "shard_group",
    "wrap_like",
]


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (e.g. a parameter or gradient sharded by FSDP2).

    Without importing ``torch.distributed.tensor`` (0.6 s): no DTensor exists before it is imported.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def any_dtensor(tensors: Iterable) -> bool:
    """Whether any entry of ``tensors`` (``None`` entries allowed) is a DTensor."""
    return any(is_dtensor(t) for t in tensors)


def local(t):
    """The local shard of a DTensor (the same storage: in-place ops on it update the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(tensors: Iterable) -> list | None:
    """The process groups over which the DTensors among ``tensors`` are split, or ``None`` if none is one.

    A sum over all coordinates of such tensors is the local sum all-reduced over each returned group
    in turn (one group per mesh dimension that shards; replicated mesh dimensions hold copies and
    are left out). Every DTensor must share one device mesh and placements (as FSDP2 lays out a
    model's parameters and gradients); mixing them with plain tensors is refused, since a plain
    tensor's coordinates would be counted once per rank.

    Raises:
        ValueError: mixed DTensors and plain tensors, or DTensors on different meshes or placements.
    """
    tensors = [t for t in tensors if t is not None]
    dts = [t for t in tensors if is_dtensor(t)]
    if not dts:
        return None
    if len(dts) != len(tensors):
        raise ValueError(
            "Some tensors are DTensors (sharded, e.g. by FSDP2) and some are not: shard every parameter the "
            "optimizer holds (fully_shard the root module too), or none"
        )
    mesh, placements = dts[0].device_mesh, tuple(dts[0].placements)
    for t in dts[1:]:
        if t.device_mesh != mesh or tuple(t.placements) != placements:
            raise ValueError(
                f"DTensors with different layouts ({placements} on {mesh} and {tuple(t.placements)} on "
                f"{t.device_mesh}): the sharded path needs one layout for all parameters (FSDP2's Shard(0))"
            )
    for p in placements:
        if p.is_partial():
            raise ValueError(f"Partial DTensor placements are not supported here: {placements}")
    return [mesh.get_group(mesh_dim=i) for i, p in enumerate(placements) if p.is_shard()]


def all_reduce_sum(t: torch.Tensor, groups: Sequence | None) -> torch.Tensor:
    """Sum ``t`` in place over every group of ``groups`` (from :func:`shard_group`; ``None``: no-op)."""
    for g in groups or ():
        torch.distributed.all_reduce(t, group=g)
    return t


def local_shard(full: torch.Tensor, like) -> torch.Tensor:
    """The part of ``full`` (the whole, unsharded tensor, the same on every rank) that this rank holds
    of the DTensor ``like``, with no communication; ``full`` itself if ``like`` is a plain tensor.

    Used to draw a random tensor exactly as one process would (the full draw from a generator
    seeded alike on every rank) and keep this rank's shard: a sharded run then sees the same probes
    as an unsharded one, at the cost of drawing the full tensor on every rank (all of a model's
    coordinates per probe, one parameter's full size in memory at a time).
    """
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return shard.clone(memory_format=torch.contiguous_format)  # a copy: the full draw can be freed


def wrap_like(t: torch.Tensor, like):
    """``t``, this rank's shard, as a DTensor laid out like ``like`` (``t`` itself if ``like`` is plain)."""
    if not is_dtensor(like):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def global_norm(tensors: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2 norm of all ``tensors`` together, computed in ``dtype``; DTensors' shards summed over their
    ranks (one all-reduce of a scalar, no gather).

    Computed the same way sharded or not: each (local) tensor's norm in ``dtype``, squared and
    summed, the sum all-reduced when sharded, then the square root. A sharded result and a
    one-process one still differ in the last bits (a shard's norm sums fewer terms)."""
    norms = torch.stack([torch.linalg.vector_norm(local(t).detach().to(dtype)) for t in tensors])
    return all_reduce_sum(norms.square().sum(), shard_group(tensors)).sqrt()


def fully_shard_blocks(module: torch.nn.Module, mesh) -> torch.nn.Module:
    """Apply FSDP2's ``fully_shard`` to every block of ``module`` and then to ``module`` itself.

    Blocks are the composite entries (modules with submodules, e.g. transformer or residual blocks)
    of the outermost ``nn.ModuleList`` / ``nn.Sequential`` containers below ``module``: each block's
    parameters are all-gathered only while it runs. The root group holds the rest (embeddings,
    heads, plain layers). Parameters are sharded along dim 0 over the 1-d ``mesh``. Returns
    ``module``, changed in place."""
    from torch.distributed.fsdp import fully_shard

    for block in list(_blocks(module)):
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def _blocks(module: torch.nn.Module):
    """Composite entries of the outermost ``nn.ModuleList``/``nn.Sequential``s under ``module``."""
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            yield from (entry for entry in child if next(entry.children(), None) is not None)
        else:
            yield from _blocks(child)
