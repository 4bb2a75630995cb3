"""Run a function on several CPU processes joined in a gloo process group (tests of the
torch.distributed paths), and collect what each rank returns."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args: tuple, lightning: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    if lightning:  # an external launcher's environment: the Trainer joins the ranks itself
        os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def spawn(fn, *args, world: int = 2, lightning: bool = False) -> list:
    """``[fn(rank, world, *args) for each rank]``, run in ``world`` spawned CPU processes (gloo).

    ``fn`` must be a module-level function (pickled by reference). With ``lightning=True`` the
    processes get the environment of an external launcher (``LOCAL_RANK``, ``NODE_RANK``, no
    process group yet): a Lightning ``Trainer`` inside ``fn`` joins them as torchrun-started ranks.
    """
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, free_port(), out, fn, args, lightning), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
