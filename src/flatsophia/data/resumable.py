"""A training ``DataLoader`` that resumes mid-epoch at the batch it stopped, with the same RNG streams.

Lightning saves the ``state_dict()`` of every training loader that has one in each checkpoint and
hands it back to ``load_state_dict()`` just before it creates the first iterator of a resumed fit.
:class:`ResumableDataLoader` uses that to continue exactly where a checkpoint was taken:

- the shuffling order: the global torch RNG state at the start of the interrupted epoch is saved and
  restored before the new iterator draws its permutation (``RandomSampler``) and base seed (as
  before, both come from the global RNG, so runs that never resume are unchanged);
- the position: the batches the run had consumed in that epoch are drawn and dropped;
- the RNG streams at the checkpoint (torch CPU and current CUDA device, Python ``random``, NumPy),
  restored after that, so dropout and sampled estimator labels continue as in a run never stopped.

The number of batches consumed is Lightning's count (its fetcher reads one batch ahead, so the
loader's own count would be off by one): :class:`flatsophia.callbacks.ExactResume`, which the
training function adds to every run, writes it into the saved state. A state without it (a
checkpoint written without that callback) restores nothing.

Exact for checkpoints taken at an optimizer-step boundary (every checkpoint the template writes
while training), with ``num_workers=0`` or workers without random transforms (worker seeds derive
from a base seed drawn once per iterator, which persistent workers do not redraw per epoch). Under
DDP the state of rank 0 is saved (the only checkpoint written) and every rank restores it: the ranks
share the RNG streams (``seed_everything`` gives them the same seed and they draw alike).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["ResumableDataLoader", "capture_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The process's RNG states as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the RNG states :func:`capture_rng` returned (CUDA on the current device, where given)."""
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumableDataLoader(DataLoader):
    """``torch.utils.data.DataLoader`` (same arguments) that a resumed fit continues mid-epoch, exactly.

    See the module docstring. ``state_dict()`` holds the RNG state at the start of the current epoch's
    iterator (``epoch_rng``) and at the call (``rng``); ``batches`` (consumed in this epoch, ``0`` when the
    epoch is complete) is added by :class:`flatsophia.callbacks.ExactResume`.
    """

    _epoch_rng: torch.Tensor | None = None
    _resume: dict[str, Any] | None = None

    def __iter__(self):
        state, self._resume = self._resume, None
        if state is None or state.get("batches") is None:
            self._epoch_rng = torch.get_rng_state()
            return super().__iter__()
        batches = int(state["batches"])
        if batches == 0:  # the checkpoint closed an epoch: this iterator starts the next one
            restore_rng(state["rng"])
            self._epoch_rng = torch.get_rng_state()
            return super().__iter__()
        torch.set_rng_state(state["epoch_rng"])
        self._epoch_rng = state["epoch_rng"]
        iterator = super().__iter__()
        for _ in range(batches):
            next(iterator)
        restore_rng(state["rng"])
        return iterator

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_rng": self._epoch_rng, "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)
