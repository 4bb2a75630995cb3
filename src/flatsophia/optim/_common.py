"""Helpers shared by the optimizers: argument validation and Hessian-estimate checks."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch

from flatsophia.checks import check_betas, check_bool, check_int, check_nonneg, check_positive  # noqa: F401 (re-exported)


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


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """True when every entry of every tensor is finite (one host sync for the whole list).

    Checks each tensor's minimum and maximum (``torch.aminmax``, one read-only pass; NaN propagates
    into both, +-inf shows in one of them) instead of materialising ``isfinite`` element by element:
    ~30x cheaper on CPU, and exact (no sum that could overflow).
    """
    extremes: dict[tuple, list[torch.Tensor]] = {}  # (dtype, device) -> [min, max, ...]
    flags = []
    for t in tensors:
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


def hessian_ema_stats(states) -> dict[str, torch.Tensor]:
    """``hessian_mean`` and ``hessian_neg_frac`` over the ``"hessian"`` buffers of optimizer states."""
    hs = [s["hessian"] for s in states if "hessian" in s]
    if not hs:
        return {}
    n = sum(h.numel() for h in hs)
    return {
        "hessian_mean": sum(h.float().sum() for h in hs) / n,
        "hessian_neg_frac": sum((h < 0).sum() for h in hs).float() / n,
    }


def params_with_grad(group: dict, optimizer_name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(p, p.grad)`` for the group's parameters that have a gradient; a sparse one raises ``RuntimeError``."""
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError(f"{optimizer_name} does not support sparse gradients")
        yield p, grad


class Gathered(NamedTuple):
    """The parameters with a gradient over all groups, for the single-call (fused / compiled) steps."""

    groups: list[dict]  #: the groups with at least one such parameter, in order
    counts: list[int]  #: how many of them each of those groups has
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    states: list[dict]  #: each parameter's state, initialised

    def column(self, key: str) -> list[torch.Tensor]:
        """``state[key]`` of every parameter, in order."""
        return [s[key] for s in self.states]

    def group_index(self) -> list[int]:
        """Each parameter's index into :attr:`groups`."""
        return [i for i, n in enumerate(self.counts) for _ in range(n)]


def gather(param_groups: list[dict], init_state: Callable[[torch.Tensor, dict], dict], optimizer_name: str) -> Gathered:
    """One pass over ``param_groups``: the parameters with a gradient, their gradients and their
    states (``init_state(p, group)`` creates a missing one); a sparse gradient raises ``RuntimeError``."""
    out = Gathered([], [], [], [], [])
    for group in param_groups:
        n = len(out.params)
        for p, grad in params_with_grad(group, optimizer_name):
            out.params.append(p)
            out.grads.append(grad)
            out.states.append(init_state(p, group))
        if len(out.params) > n:
            out.groups.append(group)
            out.counts.append(len(out.params) - n)
    return out
