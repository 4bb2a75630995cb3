"""Safe defaults of the template: checkpoint loading, atomic checkpoint writes.

- :func:`load_checkpoint_file`: ``torch.load`` with ``weights_only=True`` (tensors and plain data only);
  a file that needs full unpickling is refused with :class:`UntrustedCheckpointError`, which names the
  file, the offending globals and the opt-in (``ckpt_trusted=true``) for a file the user trusts.
- :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` writing each checkpoint to a temporary
  file in the target's folder, fsync'd, then ``os.replace``d into place, so a crash, SIGKILL or full
  disk during a save leaves the previous file intact. :func:`use_atomic_checkpoint_io` installs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

__all__ = [
    "UntrustedCheckpointError",
    "load_checkpoint_file",
    "unsafe_globals",
    "atomic_torch_save",
    "AtomicCheckpointIO",
    "use_atomic_checkpoint_io",
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


# ------------------------------------------------------------------------------------ atomic saving
def _fsync_dir(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder, fsync'd and renamed into place.

    Until the rename, ``path`` keeps its previous content; a failed write removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, and not ending in .ckpt: ModelCheckpoint and `ckpt_path="last"` never pick it up.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see :func:`atomic_torch_save`).

    Lightning's own save serializes the whole checkpoint in memory, then writes it through an fsspec
    transaction whose temporary file lives in the system temp folder and is moved into place without
    fsync: across file systems that move is a copy, which a SIGKILL can leave half done, and the data
    may not be on disk when the rename is. Remote paths (``s3://`` ...) keep Lightning's save.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic_torch_save(checkpoint, path)
        return None


def use_atomic_checkpoint_io(trainer) -> None:
    """Make ``trainer`` save checkpoints with :class:`AtomicCheckpointIO`.

    Replaces Lightning's default ``TorchCheckpointIO`` (also inside a wrapping IO such as
    ``AsyncCheckpointIO``); a CheckpointIO configured by the user is kept.
    """
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    elif isinstance(current, _WrappingCheckpointIO) and type(current.checkpoint_io) is TorchCheckpointIO:
        current.checkpoint_io = AtomicCheckpointIO()
