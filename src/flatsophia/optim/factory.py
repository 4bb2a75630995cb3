"""Optimizer registry, weight-decay parameter grouping and a ``create_optimizer`` factory.

The registry records, for every optimizer this project ships, the class and which Hessian
estimator its training loop must feed it (``"none"``, ``"gnb"`` or ``"hutchinson"``). Configs,
the training loop and the tests all read it instead of checking classes one by one.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "OptimizerSpec",
    "OPTIMIZERS",
    "ALIASES",
    "HESSIAN_ESTIMATORS",
    "get_spec",
    "spec_for",
    "estimator_combinations",
    "param_groups",
    "create_optimizer",
]

#: Hessian estimators the training loop knows how to run.
HESSIAN_ESTIMATORS = ("none", "gnb", "hutchinson")


@dataclass(frozen=True)
class OptimizerSpec:
    """Metadata about one optimizer.

    Attributes:
        name: registry name (also the config file name under ``conf/optimizer/``).
        target: ``"module:Class"`` import path.
        hessian: which estimator the optimizer consumes (one of :data:`HESSIAN_ESTIMATORS`).
        description: one line for listings.
    """

    name: str
    target: str
    hessian: str
    description: str

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    @property
    def is_second_order(self) -> bool:
        return self.hessian != "none"


OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("adamw", "torch.optim:AdamW", "none", "torch's AdamW (decoupled weight decay)"),
        OptimizerSpec(
            "sophia_g", "flatsophia.optim.sophia_g:SophiaG", "gnb", "Sophia with the Gauss-Newton-Bartlett estimator"
        ),
        OptimizerSpec(
            "sophia_h", "flatsophia.optim.sophia_h:SophiaH", "hutchinson", "Sophia with the Hutchinson estimator"
        ),
        OptimizerSpec(
            "flat_sophia",
            "flatsophia.optim.flat_sophia:FlatSophia",
            "hutchinson",
            "Sophia-H with an int8 mask damping the sharpest coordinates",
        ),
        OptimizerSpec(
            "soap", "flatsophia.optim.soap:SOAP", "none", "Adam in the eigenbasis of Shampoo's preconditioner"
        ),
    )
}

#: Other names accepted by :func:`get_spec`.
ALIASES = {"sophia": "sophia_g", "sophiag": "sophia_g", "sophiah": "sophia_h", "flatsophia": "flat_sophia"}


def get_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` registered under ``name`` (or one of its aliases)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in OPTIMIZERS:
        choices = ", ".join(sorted(OPTIMIZERS) + sorted(ALIASES))
        raise ValueError(f"Unknown optimizer {name!r}; choose one of: {choices}")
    return OPTIMIZERS[key]


def estimator_combinations() -> str:
    """Which optimizers take which Hessian estimator, from the registry (aliases included), for messages.

    E.g. ``"sophia_g (sophia, sophiag) + gnb; sophia_h (sophiah), flat_sophia (flatsophia) + hutchinson;
    adamw, soap + none"``.
    """
    parts = []
    for est in HESSIAN_ESTIMATORS[1:] + HESSIAN_ESTIMATORS[:1]:
        names = []
        for spec in OPTIMIZERS.values():
            if spec.hessian != est:
                continue
            aliases = sorted(a for a, target in ALIASES.items() if target == spec.name)
            names.append(spec.name + (f" ({', '.join(aliases)})" if aliases else ""))
        if names:
            parts.append(f"{', '.join(names)} + {est}")
    return "; ".join(parts)


def spec_for(optimizer: torch.optim.Optimizer | type) -> OptimizerSpec | None:
    """The spec whose class is ``optimizer``'s class or its closest registered base class.

    "Closest" follows the method resolution order, so a subclass of :class:`FlatSophia` maps to
    ``flat_sophia`` (not to ``sophia_h``, FlatSophia's own base). ``None`` if unregistered.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    mro = cls.__mro__
    best, best_rank = None, len(mro)
    for spec in OPTIMIZERS.values():
        try:
            spec_cls = spec.cls
        except ImportError:  # pragma: no cover - an optional optimizer that is not installed
            continue
        if spec_cls in mro and mro.index(spec_cls) < best_rank:
            best, best_rank = spec, mro.index(spec_cls)
    return best


#: Substrings of parameter names that are never decayed under ``decay="matrices"``.
NO_DECAY_NAME_PARTS = ("pos_embed", "position", "cls_token", "reg_token", "dist_token", "wpe")

DECAY_RULES = ("matrices", "all", "none")


def param_groups(
    model: nn.Module,
    decay: str = "matrices",
    extra_no_decay: Iterable[str] = (),
) -> list[dict]:
    """Split ``model``'s trainable parameters into a decayed and a non-decayed group.

    Args:
        model: the module whose parameters to group.
        decay: ``"matrices"`` (default; as in the FlatSophia reference experiment: weight
            matrices and conv kernels are decayed; biases, norm weights, positional tables, class
            tokens and anything listed by the model's ``no_weight_decay()`` are not), ``"all"`` or
            ``"none"``.
        extra_no_decay: more name substrings to exclude from decay.

    Returns:
        ``[{"params": decayed}, {"params": others, "weight_decay": 0.0}]`` without empty groups;
        the decayed group takes the optimizer's ``weight_decay``.
    """
    if decay not in DECAY_RULES:
        raise ValueError(f"Invalid weight-decay rule {decay!r}; choose one of: {', '.join(DECAY_RULES)}")
    skip = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    parts = NO_DECAY_NAME_PARTS + tuple(extra_no_decay)
    decayed, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decay == "all":
            use = True
        elif decay == "none":
            use = False
        else:
            use = p.ndim >= 2 and name not in skip and not any(s in name for s in parts)
        (decayed if use else others).append(p)
    groups = []
    if decayed:
        groups.append({"params": decayed})
    if others:
        groups.append({"params": others, "weight_decay": 0.0})
    return groups


def create_optimizer(
    model_or_params: nn.Module | Iterable,
    name: str,
    decay: str = "matrices",
    **kwargs,
) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``name``.

    Args:
        model_or_params: a module (its parameters are grouped with :func:`param_groups`) or an
            iterable of parameters / parameter groups (used as given).
        name: registry name or alias, e.g. ``"flat_sophia"``.
        decay: weight-decay rule when a module is given (see :func:`param_groups`).
        **kwargs: the optimizer's own arguments (``lr``, ``weight_decay``, ...).
    """
    spec = get_spec(name)
    if isinstance(model_or_params, nn.Module):
        params = param_groups(model_or_params, decay=decay)
    else:
        params = model_or_params
    return spec.cls(params, **kwargs)
