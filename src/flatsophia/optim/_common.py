"""Helpers shared by the optimizers: argument checks, Hessian-estimate checks, older states."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence

import torch

from flatsophia.checks import (  # noqa: F401 (re-exported)
    check_betas,
    check_bool,
    check_choice,
    check_int,
    check_nonneg,
    check_positive,
)
from flatsophia.sharding import all_reduce_sum, local


def check_foreach(value) -> None:
    """Raise ``ValueError`` unless ``foreach`` is ``None``, ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid foreach: {value!r} (expected None, True or False)")


def use_foreach(foreach: bool | None, params: Sequence[torch.Tensor]) -> bool:
    """``foreach`` as given; ``None``: multi-tensor kernels when every parameter is on CUDA (as torch.optim)."""
    if foreach is not None:
        return foreach
    return bool(params) and all(p.is_cuda for p in params)


def get_value(x: torch.Tensor | float) -> torch.Tensor | float:
    """A step counter as a Python float, except while ``torch.compile`` traces (then the tensor itself).

    As ``torch.optim``'s ``_get_value``: reading the counter on the host keeps the eager step cheap,
    and keeping it a tensor under tracing stops every step count from being baked into the graph.
    """
    if torch.compiler.is_compiling():
        return x
    return x.item() if isinstance(x, torch.Tensor) else x


def by_device_and_dtype(*lists: list) -> list[list[list]]:
    """Split parallel lists into parts whose first-list tensors share one device and dtype (what
    ``torch._foreach_*`` ops need). Unlike ``Optimizer._group_tensors_by_device_and_dtype`` the other
    lists may hold any dtype (FlatSophia's int8 masks)."""
    buckets: dict[tuple, list[list]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, [[] for _ in lists])
        for out, item in zip(bucket, items):
            out.append(item)
    return list(buckets.values())


def refuse_unsupported(name: str, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Raise ``RuntimeError`` naming the optimizer for a sparse gradient (or estimate) or a complex
    parameter, given ``(parameter, gradient)`` pairs. Called before any parameter or state is touched."""
    for p, g in pairs:
        if g.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex() or g.is_complex():
            raise RuntimeError(f"{name} does not support complex parameters (view them with torch.view_as_real)")


@functools.cache
def option_defaults(cls: type) -> dict:
    """The keyword defaults of ``cls.__init__`` (``params`` excluded): what an older state lacking an
    option gets."""
    sig = inspect.signature(cls.__init__)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in ("self", "params") and p.default is not inspect.Parameter.empty
    }


def upgrade_state(optimizer: torch.optim.Optimizer) -> None:
    """Bring a loaded or unpickled state up to date, as ``torch.optim``'s ``__setstate__`` does.

    * A ``step`` stored as a plain number (older torch optimizers, many checkpoints) becomes a
      float32 0-d tensor.
    * An option missing from a parameter group (one added after the state was saved) gets the
      value of ``optimizer.defaults``, or the constructor's default.
    """
    later = option_defaults(type(optimizer))
    for name, value in later.items():
        optimizer.defaults.setdefault(name, value)
    for group in optimizer.param_groups:
        for name in later:
            group.setdefault(name, optimizer.defaults[name])
    for state in optimizer.state.values():
        step = state.get("step") if isinstance(state, dict) else None
        if step is not None and not torch.is_tensor(step):
            state["step"] = torch.tensor(float(step), dtype=torch.float32)


def hessian_params(param_groups: Iterable[dict]) -> list[torch.Tensor]:
    """The parameters a Hessian estimate is expected for, in ``param_groups`` order.

    These are the parameters with ``requires_grad=True``; estimators in :mod:`flatsophia.hessian`
    return one tensor (or ``None`` for an unused parameter) per entry of this list.
    """
    return [p for group in param_groups for p in group["params"] if p.requires_grad]


def check_estimates(
    params: Sequence[torch.Tensor], estimates: Sequence[torch.Tensor | None], what: str = "estimates"
) -> None:
    """Validate a list of per-parameter Hessian estimates against ``params``.

    Raises ``ValueError`` naming the first bad entry: wrong count, wrong shape, non-floating dtype.
    ``None`` entries (parameters that did not take part in the loss) are allowed.
    """
    if isinstance(estimates, torch.Tensor) or not isinstance(estimates, Sequence):
        raise ValueError(
            f"Invalid {what}: expected a list with one tensor per parameter, got {type(estimates).__name__}"
        )
    if len(estimates) != len(params):
        raise ValueError(
            f"Invalid {what}: got {len(estimates)} tensors for {len(params)} parameters "
            "(one per parameter with requires_grad, in param_groups order; see hessian_params())"
        )
    for i, (p, e) in enumerate(zip(params, estimates)):
        if e is None:
            continue
        if not isinstance(e, torch.Tensor):
            raise ValueError(f"Invalid {what}[{i}]: expected a tensor or None, got {type(e).__name__}")
        if e.shape != p.shape:
            raise ValueError(
                f"Invalid {what}[{i}]: shape {tuple(e.shape)} does not match the parameter's {tuple(p.shape)}"
            )
        if not e.is_floating_point():
            raise ValueError(f"Invalid {what}[{i}]: dtype {e.dtype} is not a floating-point dtype")


def all_finite(tensors: Iterable[torch.Tensor | None], groups: Sequence | None = None) -> bool:
    """True when every entry of every tensor is finite (one host sync for the whole list).

    Reads each tensor's minimum and maximum (``torch.aminmax``: NaN propagates into both, +-inf shows
    in one of them) rather than materialising ``isfinite`` element by element. DTensors (sharded
    parameters) are read shard by shard; with ``groups`` (:func:`flatsophia.sharding.shard_group`)
    the answer is all-reduced, so every rank gets the same one (one all-reduce of one flag).
    """
    if groups:
        tensors = [local(t) for t in tensors if t is not None]
        device = tensors[0].device if tensors else "cpu"
        flag = torch.tensor([0 if all_finite(tensors) else 1], dtype=torch.int32, device=device)
        all_reduce_sum(flag, groups)
        return int(flag) == 0
    extremes: dict[tuple, list[torch.Tensor]] = {}  # (dtype, device) -> [min, max, ...]
    flags = []
    for t in tensors:
        t = local(t)
        if t is None or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.is_complex():
            flags.append(torch.isfinite(t).all())
            continue
        extremes.setdefault((t.dtype, t.device), []).extend(torch.aminmax(t.detach()))
    flags += [torch.isfinite(torch.stack(vals)).all() for vals in extremes.values()]
    if not flags:
        return True
    return bool(torch.stack(flags).all()) if len(flags) > 1 else bool(flags[0])
