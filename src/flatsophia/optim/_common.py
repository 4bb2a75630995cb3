"""Helpers shared by the optimizers: argument checks, Hessian-estimate checks, older states."""

from __future__ import annotations

import functools
import inspect
import numbers
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

#: Parameter dtypes whose optimizer state and update arithmetic default to float32.
HALF_DTYPES = (torch.float16, torch.bfloat16)

_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def plain_numbers(options: dict) -> None:
    """Replace NumPy scalars among ``options`` (also inside ``betas``) by Python numbers, in place.

    ``np.float32(1e-3)`` is then the float ``1e-3`` rounded to float32, as ``torch.optim`` reads it,
    and every later product (``lr * weight_decay``) runs in Python's double precision rather than in
    the NumPy scalar's type.
    """

    def plain(value):
        if isinstance(value, (tuple, list)):
            return type(value)(plain(v) for v in value)
        if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)) and hasattr(value, "item"):
            return value.item()
        return value

    for key, value in options.items():
        if key != "params":
            options[key] = plain(value)


def check_lr(value) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0 or a 1-element floating tensor
    holding one (as ``torch.optim``; a scheduler may then update it in place)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(
                f"Invalid learning rate: a tensor of shape {tuple(value.shape)} and dtype {value.dtype} "
                "(expected a finite number >= 0, or a 1-element floating tensor holding one)"
            )
        check_nonneg("learning rate", value.item())
        return
    check_nonneg("learning rate", value)


def lr_value(lr: float | torch.Tensor) -> float:
    """A group's learning rate as a Python float (a tensor learning rate is read once per step; a
    NumPy scalar put into a group after construction counts as the float it holds)."""
    return lr if isinstance(lr, float) else float(lr)


def check_capturable(name: str, value) -> None:
    """Accept ``capturable=False`` (torch.optim's and the authors' keyword); refuse ``True`` with what to use."""
    check_bool("capturable", value)
    if value:
        raise ValueError(
            f"Invalid capturable: True ({name} has no CUDA-graph-capturable step; use "
            "torch.compile(optimizer.step), whose graph keeps the step counters as tensors, and "
            "leave capturable=False)"
        )


def parse_dtype(name: str, value: torch.dtype | str | None) -> torch.dtype | None:
    """A state dtype option as a floating ``torch.dtype`` or ``None``; names such as ``"bf16"`` are accepted."""
    if isinstance(value, str):
        attr = _DTYPE_ALIASES.get(value, value).removeprefix("torch.")
        parsed = getattr(torch, attr, None)
        if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
            raise ValueError(f"Invalid {name}: {value!r} (expected one of bfloat16, float16, float32, float64)")
        return parsed
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"Invalid {name}: {value!r} (expected None or a floating torch.dtype)")
    return value


def state_dtype(option: torch.dtype | None, param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of a state buffer: ``option`` when set, else float32 for bf16/fp16 parameters, else the parameter's."""
    if option is not None:
        return option
    return torch.float32 if param_dtype in HALF_DTYPES else param_dtype


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """Dtype the update is computed in: the widest of float32 and ``dtypes`` (parameter, state)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def widened(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``tensors`` themselves when all have ``dtype``, else copies in ``dtype`` (written back by
    :func:`write_back`). One list holds one dtype (see :func:`by_device_and_dtype`)."""
    return tensors if all(t.dtype == dtype for t in tensors) else [t.to(dtype) for t in tensors]


def write_back(targets: list[torch.Tensor], work: list[torch.Tensor]) -> None:
    """Copy the wider working tensors of :func:`widened` into ``targets`` (one rounding each)."""
    if work is not targets:
        torch._foreach_copy_(targets, work)


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
    """Split parallel lists into parts whose first-list tensors share one device, and each list one
    dtype (what ``torch._foreach_*`` ops need). Unlike ``Optimizer._group_tensors_by_device_and_dtype``
    the lists may hold different dtypes from each other (FlatSophia's int8 masks, a float32 state of
    bf16 parameters)."""
    buckets: dict[tuple, list[list]] = {}
    for items in zip(*lists):
        key = (items[0].device, *(t.dtype for t in items))
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
