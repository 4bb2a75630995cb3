"""Gauss-Newton-Bartlett on 2 gloo ranks: the labels are those of one process over the global batch
(the ranks' rows concatenated in rank order), so they are independent across ranks, and Sophia-G's
estimate averaged over ranks equals a single process's, under DDP and FSDP2.

Labels are read back through the gradient w.r.t. the logits: d CE / d z = (softmax(z) - onehot(yhat)) / n.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _spawn import spawn
from flatsophia.hessian import GaussNewtonBartlett, HessianRefresher
from flatsophia.hessian.refresh import distributed_mean
from flatsophia.optim import SophiaG

F64 = torch.float64
ROWS, CLASSES = 3000, 4
STEPS = 4


def same_logits() -> torch.Tensor:
    """The logits every rank holds in the same-rows test: rows from near-uniform to peaked."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, CLASSES, generator=g, dtype=F64) * torch.linspace(0.1, 3, ROWS, dtype=F64)[:, None]


def lm_logits(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-shaped logits (B, T, V) and a valid mask, with a different batch size on each rank."""
    g = torch.Generator().manual_seed(10 + rank)
    batch = 3 - rank
    return torch.randn(batch, 5, 7, generator=g, dtype=F64), torch.rand(batch, 5, generator=g) > 0.3


def sampled(est, logits, valid=None):
    """The labels ``est`` samples for ``logits`` (-1 where not valid), from its gradient."""
    z = nn.Parameter(logits.clone())
    (g,) = est(lambda: z, None, [z], valid_mask=valid)
    n = int(valid.sum()) if valid is not None else logits[..., 0].numel()
    valid = torch.ones(logits.shape[:-1], dtype=torch.bool) if valid is None else valid
    onehot = (torch.softmax(logits, -1) - g * n)[valid]
    labels = torch.full(logits.shape[:-1], -1)
    labels[valid] = onehot.argmax(-1)
    torch.testing.assert_close(onehot, F.one_hot(labels[valid], logits.shape[-1]).to(F64), rtol=0, atol=1e-9)
    assert torch.equal(g[~valid], torch.zeros_like(g[~valid]))
    return labels


def data():
    """STEPS global batches of 8 examples: rank r of 2 reads rows 4r .. 4r + 3."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 8, 6, generator=g, dtype=F64)
    return x, (x[..., 0] + x[..., 1] > 0).long() + (x[..., 2] > 0.5).long()


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(F64)


def train(model, rows, reduce=None, ddp=None):
    """Sophia-G with a GNB refresh on every step, on ``rows`` of each global batch; ``ddp``: the
    DistributedDataParallel wrapper the training pass goes through."""
    opt = SophiaG(model.parameters(), lr=0.05, rho=0.05, betas=(0.9, 0.9), bs=8)
    refresher = HessianRefresher(opt, every_k=1, seed=3, reduce=reduce)
    xs, ys = data()
    for step in range(STEPS):
        x, y = xs[step, rows], ys[step, rows]
        F.cross_entropy((ddp or model)(x), y).backward()
        refresher.maybe_refresh(step, lambda x=x: model(x), lambda out, y=y: F.cross_entropy(out, y))
        opt.step()
        opt.zero_grad(set_to_none=True)

    def full(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    return {
        "params": [full(p) for p in model.parameters()],
        "hessian": [full(opt.state[p]["hessian"]) for p in model.parameters()],
        "refreshes": refresher.refreshes,
        "rng": refresher.estimator.state_dict()["generators"]["cpu"],
    }


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    est = GaussNewtonBartlett(seed=0)
    out["same"] = torch.stack([sampled(est, same_logits()) for _ in range(2)])
    logits, valid = lm_logits(rank)
    out["lm"] = sampled(est, logits, valid)
    out["lm_rng"] = est.state_dict()["generators"]["cpu"]

    rows = slice(4 * rank, 4 * rank + 4)
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    out["ddp"] = train(model, rows, reduce=distributed_mean, ddp=ddp)
    sharded = net()
    fully_shard(sharded[0], mesh=init_device_mesh("cpu", (world,)))
    fully_shard(sharded)
    out["fsdp"] = train(sharded, rows)
    return out


@pytest.fixture(scope="module")
def ranks():
    return spawn(_worker)


def test_labels_on_identical_rows_are_independent_across_ranks(ranks):
    """Both ranks hold the same logits: their labels agree as often as independent draws would
    (sum_c p_c^2 per row), not always, as when every rank replayed the same stream."""
    a, b = ranks[0]["same"], ranks[1]["same"]
    p = torch.softmax(same_logits(), -1)
    q = (p**2).sum(-1).repeat(2)  # P(same label) per row, for each of the 2 calls
    matches = (a == b).sum().item()
    expected, sd = q.sum().item(), (q * (1 - q)).sum().sqrt().item()
    assert abs(matches - expected) < 5 * sd, (
        f"{matches} same labels in {q.numel()} rows, expected {expected:.0f} +- {sd:.0f}"
    )


def test_labels_are_those_of_one_process_over_the_concatenated_batch(ranks):
    """Same rows: labels of rank 0 then rank 1 == one process on the rows stacked; LM-shaped logits,
    a valid mask and unequal batch sizes (3 and 2 sequences): the same at the valid positions."""
    est = GaussNewtonBartlett(seed=0)
    for call in range(2):
        single = sampled(est, torch.cat([same_logits(), same_logits()]))
        assert torch.equal(single, torch.cat([ranks[0]["same"][call], ranks[1]["same"][call]]))
    (l0, v0), (l1, v1) = lm_logits(0), lm_logits(1)
    single = sampled(est, torch.cat([l0, l1]), torch.cat([v0, v1]))
    assert torch.equal(single, torch.cat([ranks[0]["lm"], ranks[1]["lm"]]))
    # every rank drew the whole global batch: the generators stay identical (one checkpoint resumes all)
    assert torch.equal(ranks[0]["lm_rng"], ranks[1]["lm_rng"])
    assert torch.equal(ranks[0]["lm_rng"], est.state_dict()["generators"]["cpu"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_sophia_g_on_two_ranks_equals_one_process(ranks, kind):
    """A refresh on every step with sampled labels (DDP: averaged by distributed_mean; FSDP2: by the
    reduce-scatter): the Hessian EMA and parameters equal one process's over the global batch of 8,
    to the rounding of a mean over ranks against a mean over the batch."""
    single = train(net(), slice(None))
    for out in ranks:
        run = out[kind]
        assert run["refreshes"] == single["refreshes"] == STEPS
        assert torch.equal(run["rng"], single["rng"])
        for h, s in zip(run["hessian"], single["hessian"]):
            torch.testing.assert_close(h, s, rtol=1e-10, atol=1e-16)
        for p, s in zip(run["params"], single["params"]):
            torch.testing.assert_close(p, s, rtol=1e-10, atol=1e-12)
