"""docs/library.md and the six-line loop in the docstrings run as written: each Python block is
executed with a small classifier as ``model`` and a list of batches as ``loader`` (the DDP and FSDP2
blocks in a one-process gloo group), and each loop must have trained and refreshed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatsophia.hessian.refresh
from flatsophia.hessian import HessianRefresher
from flatsophia.optim import FlatSophia, SophiaG, SophiaH

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[2] / "docs" / "library.md"


def sections() -> dict[str, list[str]]:
    """The Python blocks of docs/library.md under each ``##``/``###`` heading."""
    out: dict[str, list[str]] = {}
    heading = ""
    for m in re.finditer(r"^(#{2,3}) ([^\n]*)$|^```python\n(.*?)^```", DOC.read_text(), flags=re.M | re.S):
        if m.group(2):
            heading = m.group(2).strip()
        else:
            out.setdefault(heading, []).append(m.group(3))
    return out


def docstring_loop(doc: str) -> str:
    """The literal block (after ``::``) of ``doc`` that holds a ``for`` loop, dedented."""
    for m in re.finditer(r"::\n\n( +)\S", doc):
        indent = m.group(1)
        lines = []
        for line in doc[m.start(1) :].splitlines():
            if line and not line.startswith(indent):
                break
            lines.append(line[len(indent) :])
        block = "\n".join(lines)
        if "for x, y in loader:" in block:
            return block
    raise AssertionError("no loop in the docstring")


def _namespace() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    loader = []
    for _ in range(4):
        x = torch.randn(8, 6, generator=g)
        loader.append((x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()))
    return {"model": model, "loader": loader, "F": F, "HessianRefresher": HessianRefresher}


def run(code: str, ns: dict | None = None) -> dict:
    ns = ns if ns is not None else _namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    exec(compile(code, str(DOC), "exec"), ns)
    after = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in ns["model"].parameters()]
    if "refresher" in code:
        assert ns["refresher"].refreshes >= 1 and ns["refresher"].skipped == 0
        assert not all(torch.equal(a.detach(), b) for a, b in zip(after, before)), "the loop trained nothing"
    return ns


def test_every_block_is_filed():
    found = sections()
    assert set(found) == {
        "The loop",
        "Sophia-G: the batch size",
        "Gradient accumulation",
        "Part of the batch",
        "Mixed precision",
        "DDP",
        "FSDP2",
        "Checkpoints",
        "The lower-level methods",
    }
    loop = found["The loop"][0]
    assert loop.count("\n") == 10 and loop.rstrip().endswith("opt.zero_grad()")  # 3 imports, 6 lines


@pytest.mark.parametrize(
    "heading", ["The loop", "Sophia-G: the batch size", "Gradient accumulation", "Part of the batch", "Mixed precision"]
)
def test_blocks_run(heading):
    for code in sections()[heading]:
        ns = run(code)
        if heading == "Mixed precision" and "bfloat16" in code:
            assert ns["refresher"].estimator.hvp == "autograd"  # auto follows the bf16 pass
        if heading == "Part of the batch":
            assert ns["refresher"].batch_fraction == 0.25 and ns["refresher"].refreshes >= 1


def test_lower_level_loop_equals_the_six_lines():
    blocks = sections()
    six, low = run(blocks["The loop"][0]), run(blocks["The lower-level methods"][0])
    assert six["refresher"].refreshes == low["refresher"].refreshes == 1
    for a, b in zip(six["model"].parameters(), low["model"].parameters()):
        assert torch.equal(a, b)


def test_checkpoint_block_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = sections()
    ns = run(blocks["The loop"][0])
    state = {k: v.clone() for k, v in ns["model"].state_dict().items()}
    exec(compile(blocks["Checkpoints"][0], str(DOC), "exec"), ns)
    assert (tmp_path / "ckpt.pt").is_file() and ns["refresher"].state_dict()["optimizer_steps"] == 4
    assert all(torch.equal(v, state[k]) for k, v in ns["model"].state_dict().items())


@pytest.mark.parametrize("heading", ["DDP", "FSDP2"])
def test_distributed_blocks_run_in_one_process(heading, tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the gloo group is on the CPU
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ns = run(sections()[heading][0])
        assert ns["refresher"].reduce is (flatsophia.hessian.refresh.distributed_mean if heading == "DDP" else None)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "doc", [flatsophia.hessian.refresh.__doc__, SophiaH.__doc__, FlatSophia.__doc__, SophiaG.__doc__]
)
def test_docstring_loops_run(doc):
    code = docstring_loop(doc)
    ns = _namespace()
    ns.update(SophiaH=SophiaH, FlatSophia=FlatSophia, SophiaG=SophiaG)
    run(code, ns)
