"""Command lines and paths as recorded in results: relative to the project checkout, so that a
committed result says how to reproduce it on any machine (``python -m flatsophia.bench --json
logs/bench.json``, not the interpreter and folders of the machine that ran it).

Plain Python only (the benchmark records commands without the template's stack).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = ["shown_path", "shown_command"]


def shown_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """``path`` relative to ``root`` (default: the working directory) when it lies inside it, else as given."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    base = Path(root if root is not None else Path.cwd()).resolve()
    try:
        return p.resolve().relative_to(base).as_posix() or "."
    except ValueError:
        return str(path)


def _shown_arg(arg: str, base: Path) -> str:
    """One argument: an absolute path, or ``key=<absolute path>`` (a Hydra override), made relative."""
    key, eq, value = arg.partition("=")
    if eq and value.startswith("/") and not key.startswith("/"):
        return key + eq + shown_path(value, base)
    return shown_path(arg, base) if arg.startswith("/") else arg


def shown_command(argv: Sequence[str], root: str | os.PathLike | None = None) -> str:
    """``argv`` as a shell command to type in ``root`` (default: the working directory): a Python
    interpreter (``/.../.venv/bin/python3.11``) shows as ``python``, and absolute paths inside ``root``
    relative to it."""
    base = Path(root if root is not None else Path.cwd()).resolve()
    args = list(argv)
    if args and Path(args[0]).name.startswith("python"):
        args[0] = "python"
    return shlex.join(_shown_arg(a, base) for a in args)
