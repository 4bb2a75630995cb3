"""Value checks shared by the optimizer library and the template, with one message shape.

Every check raises ``ValueError("Invalid <name>: <value> (expected ...)")``, naming the bad value and
what is accepted. Plain Python only, so :mod:`flatsophia.optim` can use it without the template's stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "check_int",
    "check_probability",
    "check_nonneg",
    "check_positive",
    "check_betas",
    "check_bool",
    "check_choice",
]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, low: int, allow_none: bool = False):
    """``value`` if it is an integer >= ``low`` (or ``None`` with ``allow_none``); else ``ValueError``."""
    if value is None and allow_none:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= {low}{' or null' if allow_none else ''})")
    return value


def check_probability(name: str, value, allow_none: bool = False):
    """``value`` if it is a number in (0, 1] (or ``None`` with ``allow_none``); else ``ValueError``."""
    if value is None and allow_none:
        return value
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in (0, 1]{' or null' if allow_none else ''})")
    return value


def check_nonneg(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")


def check_positive(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number > 0)")


def check_betas(betas: Sequence[float]) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair with each value in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b!r} (expected a number in [0, 1))")


def check_bool(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r} (choose one of {', '.join(map(str, choices))})")
