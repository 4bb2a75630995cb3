"""Shared behaviour of the Sophia family: argument validation, estimate checks, the bounded update
for non-positive curvature, non-finite estimates; the registry, ``param_groups`` and
``create_optimizer``."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from torch import nn

from flatsophia.optim import (
    ALIASES,
    OPTIMIZERS,
    FlatSophia,
    SophiaG,
    SophiaH,
    create_optimizer,
    get_spec,
    param_groups,
    spec_for,
)

F64 = torch.float64
SECOND_ORDER = [spec.cls for spec in OPTIMIZERS.values() if spec.is_second_order]


pytestmark = pytest.mark.usefixtures("one_thread")


def _p(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, requires_grad=True)


# ------------------------------------------------------------------------- validation table
BAD_HYPERPARAMETERS = [
    # (optimizer, kwargs, text the message must contain)
    (SophiaG, {"lr": -1e-3}, "-0.001"),
    (SophiaG, {"rho": -0.04}, "-0.04"),
    (SophiaG, {"weight_decay": -0.1}, "-0.1"),
    (SophiaG, {"betas": (1.0, 0.99)}, "1.0"),
    (SophiaG, {"betas": (0.9, -0.5)}, "-0.5"),
    (SophiaG, {"betas": (0.9,)}, "(0.9,)"),
    (SophiaG, {"bs": 0}, "0"),
    (SophiaG, {"lr": float("nan")}, "nan"),
    (SophiaH, {"lr": -0.5}, "-0.5"),
    (SophiaH, {"gamma": -0.01}, "-0.01"),
    (SophiaH, {"eps": -1e-08}, "-1e-08"),
    (SophiaH, {"eps": 0.0}, "0.0"),
    (SophiaH, {"weight_decay": -0.0001}, "-0.0001"),
    (SophiaH, {"betas": (0.965, 1.5)}, "1.5"),
    (SophiaH, {"clip_threshold": -1.0}, "-1.0"),
    (SophiaH, {"mu_dtype": "int8"}, "int8"),
    (SophiaH, {"mu_dtype": torch.int32}, "torch.int32"),
    (SophiaH, {"mu_dtype": "float128"}, "float128"),
    (FlatSophia, {"lr": -3e-3}, "-0.003"),
    (FlatSophia, {"gamma": -2.0}, "-2.0"),
    (FlatSophia, {"betas": (-0.1, 0.99)}, "-0.1"),
    (FlatSophia, {"sharp_fraction": -0.1}, "-0.1"),
    (FlatSophia, {"sharp_fraction": 1.5}, "1.5"),
    (FlatSophia, {"dampening_factor": 0}, "0"),
    (FlatSophia, {"dampening_factor": 2.5}, "2.5"),
    (FlatSophia, {"dampening_factor": 128}, "128"),
    (FlatSophia, {"dampening_factor": True}, "True"),
    (FlatSophia, {"mask_source": "hessian"}, "hessian"),
    (FlatSophia, {"mu_dtype": "bogus"}, "bogus"),
]


@pytest.mark.parametrize(
    "cls,kwargs,text",
    BAD_HYPERPARAMETERS,
    ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD_HYPERPARAMETERS],
)
def test_bad_hyperparameters(cls, kwargs, text):
    with pytest.raises(ValueError) as info:
        cls([_p(3)], **kwargs)
    assert text in str(info.value), str(info.value)



def _bs(cls) -> dict:
    """The predictions per step SophiaG needs (the others take none)."""
    return {"bs": 8} if cls is SophiaG else {}

def test_valid_edge_hyperparameters():
    SophiaG([_p(2)], lr=0.0, rho=0.0, weight_decay=0.0, betas=(0.0, 0.0))
    SophiaH([_p(2)], clip_threshold=None, mu_dtype="fp32")
    f = FlatSophia([_p(2)], sharp_fraction=1.0, dampening_factor=127.0)
    assert f.defaults["dampening_factor"] == 127 and isinstance(f.defaults["dampening_factor"], int)
    FlatSophia([_p(2)], sharp_fraction=0.0, dampening_factor=1, mask_source="ema")


@pytest.mark.parametrize("cls", SECOND_ORDER, ids=lambda c: c.__name__)
def test_bad_estimates(cls):
    a, b = _p(4, 3), _p(3)
    opt = cls([a, b])
    cases = [
        ([torch.zeros(4, 3)], "1 tensors"),  # wrong count
        ([torch.zeros(4, 3), torch.zeros(3), torch.zeros(1)], "3 tensors"),
        ([torch.zeros(4, 3), torch.zeros(5)], "(5,)"),  # wrong shape
        ([torch.zeros(3, 4), torch.zeros(3)], "(3, 4)"),
        ([torch.zeros(4, 3, dtype=torch.int64), torch.zeros(3)], "torch.int64"),  # integer dtype
        ([torch.zeros(4, 3), torch.zeros(3, dtype=torch.bool)], "torch.bool"),
        (torch.zeros(4, 3), "Tensor"),  # not a list
        ([torch.zeros(4, 3), [0.0, 0.0, 0.0]], "list"),
    ]
    for estimates, text in cases:
        with pytest.raises(ValueError) as info:
            opt.update_hessian(estimates)
        assert text in str(info.value), (text, str(info.value))
    assert len(opt.state) == 0


# --------------------------------------------------- non-positive curvature: bounded updates
def _family_cases(n_cases: int):
    """Seeded random hyperparameters (hypothesis is not installed in this venv)."""
    rng = random.Random(1234)
    for case in range(n_cases):
        cls = (SophiaG, SophiaH, FlatSophia)[case % 3]
        shapes = [tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        hyper = {
            "lr": 10 ** rng.uniform(-4, 0),
            "weight_decay": rng.choice([0.0, 10 ** rng.uniform(-3, 0)]),
            "betas": (rng.uniform(0, 0.999), rng.uniform(0, 0.999)),
        }
        if cls is SophiaG:
            hyper["rho"] = 10 ** rng.uniform(-3, 0)
            hyper["bs"] = 5120
            clip = 1.0
        else:
            clip = rng.choice([1.0, rng.uniform(0.1, 3.0)])
            hyper.update(gamma=10 ** rng.uniform(-3, 1), eps=10 ** rng.uniform(-12, -2), clip_threshold=clip)
            if cls is FlatSophia:
                hyper.update(sharp_fraction=rng.uniform(0, 1), dampening_factor=rng.randint(1, 127))
        yield case, cls, shapes, hyper, clip


def rng_scale(g: torch.Generator) -> float:
    """A random exponent in [-2, 2) drawn from ``g``."""
    return 4 * torch.rand((), generator=g, dtype=F64).item() - 2


@pytest.mark.parametrize("chunk", range(3), ids=["SophiaG", "SophiaH", "FlatSophia"])
def test_update_bounded_when_hessian_nonpositive(chunk):
    n_checked = 0
    for case, cls, shapes, hyper, clip in _family_cases(60):
        if case % 3 != chunk:
            continue
        g = torch.Generator().manual_seed(case)
        params = [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in shapes]
        opt = cls(params, **hyper)
        lr, wd = hyper["lr"], hyper["weight_decay"]
        for _t in range(4):
            # h <= 0 everywhere: negative, and exactly zero for about a third of the coordinates.
            neg = [-torch.rand(s, generator=g, dtype=F64) * 10 ** rng_scale(g) for s in shapes]
            neg = [torch.where(torch.rand(e.shape, generator=g) < 0.33, torch.zeros_like(e), e) for e in neg]
            if cls is SophiaG:  # ghat*ghat >= 0 always: negative values only by state manipulation
                for p, e in zip(params, neg, strict=True):
                    opt._init_state(p, opt.param_groups[0])["hessian"].copy_(e)
            else:
                assert opt.update_hessian(neg)
                assert all((opt.state[p]["hessian"] <= 0).all() for p in params)
            for p in params:
                grad = torch.randn(p.shape, generator=g, dtype=F64) * 10 ** (1.5 * rng_scale(g))
                p.grad = torch.where(torch.rand(p.shape, generator=g) < 0.1, torch.zeros_like(grad), grad)
            before = [p.detach().clone() for p in params]
            opt.step()
            for p, b in zip(params, before, strict=True):
                move = (p.detach() - b * (1 - lr * wd)).abs()
                assert (move <= lr * clip * (1 + 1e-12) + 1e-15).all(), (cls.__name__, hyper, move.max())
                n_checked += p.numel()
    assert n_checked > 100


@pytest.mark.parametrize("cls", SECOND_ORDER, ids=lambda c: c.__name__)
def test_nonfinite_estimate_is_skipped(cls):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(6, 4), (4,)]]
    opt = cls(params, sharp_fraction=0.25) if cls is FlatSophia else cls(params, **_bs(cls))
    fresh = copy.deepcopy(opt)
    with pytest.warns(RuntimeWarning, match="NaN/inf"):
        assert fresh.update_hessian([torch.full((6, 4), float("nan")), torch.zeros(4)]) is False
    assert len(fresh.state) == 0
    opt.update_hessian([torch.randn(p.shape, generator=g) for p in params])
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    for bad in (float("nan"), float("inf"), -float("inf")):
        est = [torch.randn(p.shape, generator=g) for p in params]
        est[1][2] = bad
        with pytest.warns(RuntimeWarning, match="NaN/inf"):
            assert opt.update_hessian(est) is False
        after = opt.state_dict()
        for k, st in before["state"].items():
            assert set(st) == set(after["state"][k])
            for key, v in st.items():
                assert v.dtype == after["state"][k][key].dtype
                assert torch.equal(v, after["state"][k][key])


# ------------------------------------------------------------------------------- registry
def test_get_spec_and_aliases():
    assert get_spec("sophia").name == "sophia_g"
    assert get_spec("SophiaG").name == "sophia_g"
    assert get_spec("FLAT_SOPHIA").name == "flat_sophia"
    for alias, target in ALIASES.items():
        assert get_spec(alias) is OPTIMIZERS[target]
    assert get_spec("sophia_h").hessian == "hutchinson"
    assert get_spec("flat_sophia").hessian == "hutchinson"
    assert get_spec("sophia_g").hessian == "gnb"
    assert get_spec("adamw").hessian == "none" and not get_spec("adamw").is_second_order
    with pytest.raises(ValueError) as info:
        get_spec("lion")
    msg = str(info.value)
    assert "'lion'" in msg
    for name in list(OPTIMIZERS) + list(ALIASES):
        assert name in msg


def test_spec_for_and_class_attributes():
    assert spec_for(FlatSophia).name == "flat_sophia"  # exact class wins over its base SophiaH
    assert spec_for(SophiaH([_p(2)])).name == "sophia_h"
    assert spec_for(torch.optim.AdamW).name == "adamw"
    assert spec_for(torch.optim.SGD) is None

    class MyFlat(FlatSophia):
        pass

    assert spec_for(MyFlat).name == "flat_sophia"
    for spec in OPTIMIZERS.values():
        assert spec_for(spec.cls) is spec
        assert getattr(spec.cls, "is_second_order", False) == spec.is_second_order
        assert getattr(spec.cls, "hessian_estimator", "none") == spec.hessian


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(2, 2))  # a matrix listed in no_weight_decay()

    def no_weight_decay(self):
        return {"scale"}

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.fc(self.norm(x)).tanh()
        return self.head(x[:, 0]) * self.scale.sum()


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_matrices():
    m = Block()
    groups = param_groups(m)
    assert len(groups) == 2
    decayed, others = groups
    assert "weight_decay" not in decayed and others["weight_decay"] == 0.0
    assert _names(m, decayed["params"]) == {"conv.weight", "embed.weight", "fc.weight", "head.weight"}
    assert _names(m, others["params"]) == {
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "pos_embed",
        "cls_token",
        "norm.weight",
        "norm.bias",
        "fc.bias",
        "head.bias",
        "scale",
    }
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert len(decayed["params"]) + len(others["params"]) == n_trainable  # frozen ones excluded
    extra = param_groups(m, extra_no_decay=["head"])
    assert "head.weight" in _names(m, extra[1]["params"])
    assert _names(m, param_groups(m, decay="all")[0]["params"]) == _names(
        m, [p for p in m.parameters() if p.requires_grad]
    )
    none = param_groups(m, decay="none")
    assert len(none) == 1 and none[0]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="'some'"):
        param_groups(m, decay="some")
    only_bias = nn.Module()
    only_bias.b = nn.Parameter(torch.zeros(3))
    assert [len(g["params"]) for g in param_groups(only_bias)] == [1]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_create_optimizer_every_registry_entry(name):
    spec = OPTIMIZERS[name]
    torch.manual_seed(0)
    m = Block()
    opt = create_optimizer(m, name, lr=1e-3, weight_decay=0.05)
    assert type(opt) is spec.cls
    assert spec_for(opt) is spec
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    tokens = torch.randint(0, 10, (4, 5))
    labels = torch.randint(0, 3, (4,))
    loss_fn = lambda out: nn.functional.cross_entropy(out, labels)
    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(2):
        if spec.is_second_order:
            from flatsophia.hessian import build_estimator

            est = build_estimator(spec.hessian, seed=1)
            estimates = est(lambda: m(tokens), loss_fn, opt.hessian_params())
            assert opt.update_hessian(estimates)
        opt.zero_grad()
        loss_fn(m(tokens)).backward()
        opt.step(**({"bs": len(labels)} if spec.hessian == "gnb" else {}))
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_create_optimizer_with_param_list_and_alias():
    ps = [_p(3, 3), _p(3)]
    opt = create_optimizer(ps, "sophia", lr=0.5, rho=0.1)
    assert isinstance(opt, SophiaG) and opt.param_groups[0]["lr"] == 0.5
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    opt = create_optimizer([{"params": ps[:1]}, {"params": ps[1:], "lr": 0.1}], "flatsophia", lr=0.2)
    assert isinstance(opt, FlatSophia) and [g["lr"] for g in opt.param_groups] == [0.2, 0.1]
    with pytest.raises(ValueError, match="Unknown optimizer"):
        create_optimizer(ps, "not_an_optimizer")
    assert math.isclose(create_optimizer(ps, "adamw", lr=1e-3).param_groups[0]["lr"], 1e-3)
