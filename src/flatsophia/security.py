"""Safe defaults of the template: checkpoint loading.

- :func:`load_checkpoint_file`: ``torch.load`` with ``weights_only=True`` (tensors and plain data only);
  a file that needs full unpickling is refused with :class:`UntrustedCheckpointError`, which names the
  file, the offending globals and the opt-in (``ckpt_trusted=true``) for a file the user trusts.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = [
    "UntrustedCheckpointError",
    "load_checkpoint_file",
    "unsafe_globals",
]

TRUST_OPTION = "ckpt_trusted=true"


# ----------------------------------------------------------------------------------- checkpoint loading
class UntrustedCheckpointError(ValueError):
    """A checkpoint needs full unpickling (it holds Python objects, not only tensors and plain data)."""


def unsafe_globals(path: str | Path, err: BaseException | None = None) -> list[str]:
    """The globals (``module.name``) in checkpoint ``path`` that ``weights_only=True`` does not allow.

    Read from the pickle without running it (``torch.serialization.get_unsafe_globals_in_checkpoint``);
    for files it cannot read (the legacy non-zip format), taken from the text of ``err``.
    """
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        found = []
    if not found and err is not None:
        found = re.findall(r"GLOBAL ([\w.]+)", str(err))
    return list(dict.fromkeys(found))


def load_checkpoint_file(path: str | Path, trusted: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path)`` with ``weights_only=True``; ``trusted=True`` unpickles fully (with a warning).

    Raises :class:`UntrustedCheckpointError` (naming the file, the offending globals and the opt-in)
    when ``weights_only=True`` refuses the file; nothing in the file has run by then.
    """
    if trusted:
        log.warning(
            "ckpt_trusted=true: loading %s with full unpickling (torch.load weights_only=False). "
            "Unpickling runs any code the file contains; do this only for files you trust.",
            path,
        )
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        names = unsafe_globals(path, err)
        what = ", ".join(names) if names else str(err).strip().splitlines()[0]
        raise UntrustedCheckpointError(
            f"Refusing to load checkpoint {path}: it holds Python objects that only full unpickling can "
            f"load, which would run code from the file ({what}). Checkpoints written by this project hold "
            f"only tensors and plain data and never need that. If you trust this file (you wrote it, or "
            f"know who did), load it anyway with {TRUST_OPTION} (Python: load_checkpoint(path, trusted=True))."
        ) from err
