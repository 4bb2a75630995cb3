"""FlatSophia's mask variants used by the ablations: EMA-based and random (control) masks."""

from __future__ import annotations

import torch

from flatsophia.optim import FlatSophia


def _opt(**kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(40, 25)), torch.nn.Parameter(torch.randn(100))]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps, FlatSophia(ps, lr=1e-2, sharp_fraction=0.2, dampening_factor=10, **kw)


def _masks(opt):
    return torch.cat([opt.state[p]["mask"].reshape(-1) for group in opt.param_groups for p in group["params"]])


def test_random_mask_has_the_same_size_is_random_and_reproducible():
    ps, est = _opt()
    d = [torch.randn_like(p) for p in ps]
    est.update_hessian(d)
    _, rnd = _opt(mask_source="random", mask_seed=3)
    rnd.update_hessian(d)
    _, rnd2 = _opt(mask_source="random", mask_seed=3)
    rnd2.update_hessian(d)
    m_est, m_rnd = _masks(est), _masks(rnd)
    assert m_rnd.dtype == torch.int8
    assert (m_rnd == 10).sum() == (m_est == 10).sum() == int(0.2 * 1100) - 1
    assert torch.equal(m_rnd, _masks(rnd2))
    # Unrelated to |d|: the overlap with the estimate's mask is near chance (0.2), far from 1.
    overlap = ((m_rnd == 10) & (m_est == 10)).sum().item() / (m_est == 10).sum().item()
    assert overlap < 0.5
    # A later refresh draws a different random mask.
    rnd.step()
    rnd.update_hessian(d)
    assert not torch.equal(m_rnd, _masks(rnd))


def test_ema_mask_follows_the_hessian_ema():
    ps, opt = _opt(mask_source="ema")
    d1 = [torch.randn_like(p) for p in ps]
    opt.update_hessian(d1)
    ema = torch.cat([opt.state[p]["hessian"].reshape(-1) for p in ps]).abs()
    k = int(0.2 * ema.numel())
    tau = ema.kthvalue(ema.numel() - k + 1).values
    assert torch.equal(_masks(opt) == 10, ema > tau)
