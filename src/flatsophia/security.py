"""Safe defaults of the template: checkpoint loading, atomic checkpoint writes, secret redaction.

- :func:`load_checkpoint_file`: ``torch.load`` with ``weights_only=True`` (tensors and plain data only);
  a file that needs full unpickling is refused with :class:`UntrustedCheckpointError`, which names the
  file, the offending globals and the opt-in (``ckpt_trusted=true``) for a file the user trusts.
- :class:`AtomicCheckpointIO`: Lightning's ``TorchCheckpointIO`` writing each checkpoint to a temporary
  file in the target's folder, fsync'd, then ``os.replace``d into place, so a crash, SIGKILL or full
  disk during a save leaves the previous file intact. :func:`use_atomic_checkpoint_io` installs it.
- Secrets: values of environment variables named ``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``
  (e.g. ``WANDB_API_KEY``) are replaced by ``***`` in logged hyperparameters, the printed config tree,
  checkpoints' hyperparameters, Hydra's ``.hydra/*.yaml`` dumps and the run log
  (:class:`RedactSecretsCallback`, a Hydra callback set in ``conf/hydra/default.yaml``), and the
  command line W&B records (:func:`redacted_argv`, used by ``flatsophia.utils.loggers.WandbLogger``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from hydra.experimental.callback import Callback
from hydra.types import RunMode
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
    "REDACTED",
    "secret_values",
    "redact",
    "RedactingFilter",
    "install_log_redaction",
    "redact_files",
    "redacted_argv",
    "RedactSecretsCallback",
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


#: Checkpoint entries that hold configuration (redacted of secrets before a save).
_HPARAM_KEYS = ("hyper_parameters", "datamodule_hyper_parameters")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (see :func:`atomic_torch_save`).

    Lightning's own save serializes the whole checkpoint in memory, then writes it through an fsspec
    transaction whose temporary file lives in the system temp folder and is moved into place without
    fsync: across file systems that move is a copy, which a SIGKILL can leave half done, and the data
    may not be on disk when the rename is. Remote paths (``s3://`` ...) keep Lightning's save.
    Hyperparameters are redacted of secrets (see :func:`redact`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        checkpoint = {k: redact(v) if k in _HPARAM_KEYS else v for k, v in checkpoint.items()}
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


# ------------------------------------------------------------------------------------------ secrets
REDACTED = "***"

#: Environment variables whose values are secrets.
SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)

#: Shorter values are not treated as secrets: they would match ordinary text by chance.
MIN_SECRET_LEN = 6


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of the secret-named environment variables (longest first), read now."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v.strip()) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact(obj: Any, secrets: Iterable[str] | None = None) -> Any:
    """``obj`` with every occurrence of a secret in its strings replaced by ``***``.

    Walks dicts, lists and tuples (keys too; they come back as plain ``dict``/``list``/``tuple``);
    other objects (tensors, numbers) are kept as they are. ``obj`` itself when there are no secrets.
    """
    secrets = secret_values() if secrets is None else list(secrets)
    return _redact(obj, secrets) if secrets else obj


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, str):
        return _redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redact(v, secrets) for v in obj]
    if type(obj) is tuple:
        return tuple(_redact(v, secrets) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """Replaces secrets in log records (message and traceback) by ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_values()
        if not secrets:
            return True
        message = record.getMessage()
        clean = _redact_text(message, secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact_text(record.exc_text, secrets)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add a :class:`RedactingFilter` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def redact_files(paths: Iterable[str | Path]) -> list[Path]:
    """Rewrite the given text files with secrets replaced by ``***`` (atomically); return those changed."""
    secrets = secret_values()
    changed = []
    for p in map(Path, paths):
        if not secrets or not p.is_file():
            continue
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
        clean = _redact_text(text, secrets)
        if clean != text:
            tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(clean, encoding="utf-8", errors="surrogateescape")
            os.replace(tmp, p)
            changed.append(p)
    return changed


@contextlib.contextmanager
def redacted_argv():
    """``sys.argv`` with secrets replaced by ``***`` inside the block, restored after it.

    For tools that record the command line (W&B's run metadata): a secret given as an override stays
    out of their records, while ``sys.argv`` itself keeps it (DDP re-launches the script from it).
    """
    saved = sys.argv
    sys.argv = redact(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


class RedactSecretsCallback(Callback):
    """Hydra callback: keep secrets out of what a run writes.

    At the start of each job (after Hydra has written ``.hydra/config.yaml``, ``hydra.yaml`` and
    ``overrides.yaml`` and set up logging), rewrites those files, and a multirun's ``multirun.yaml``,
    with secrets replaced by ``***``, and adds :class:`RedactingFilter` to the log handlers.
    """

    def on_job_start(self, config, **kwargs: Any) -> None:
        install_log_redaction()
        hydra_cfg = config.hydra
        files = []
        if hydra_cfg.get("output_subdir"):
            folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
            files += sorted(folder.glob("*.yaml"))
        if hydra_cfg.get("mode") == RunMode.MULTIRUN:
            with contextlib.suppress(Exception):
                files.append(Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml")
        for p in redact_files(files):
            log.info("Secrets in %s replaced by %s", p, REDACTED)
