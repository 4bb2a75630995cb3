"""torch.optim's documented contract, checked for every optimizer of the registry (AdamW as the control):
state_dict round trips (also older formats), hooks, deepcopy, param-group changes, zero_grad, a step
without gradients, printing, rejected options and refused inputs."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import numpy as np
import pytest
import torch

from flatsophia.optim import OPTIMIZERS

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(OPTIMIZERS)
OURS = [n for n in NAMES if OPTIMIZERS[n].cls.__module__.startswith("flatsophia.")]

#: Settings that move the tiny parameters below noticeably (SOAP: an eigenbasis refresh every 2 steps);
#: the options of LATER_OPTIONS keep their defaults.
KWARGS = {
    "adamw": dict(lr=1e-2, weight_decay=0.1),
    "sophia_g": dict(lr=1e-2, rho=0.05, weight_decay=0.1, bs=8),
    "sophia_h": dict(lr=1e-2, weight_decay=0.1),
    "flat_sophia": dict(lr=1e-2, weight_decay=0.1, sharp_fraction=0.25, dampening_factor=4),
    "soap": dict(lr=1e-2, precondition_frequency=2),
}

#: Options each class gained after its first release: an older pickle or state_dict lacks them.
LATER_OPTIONS = {
    "adamw": ("maximize", "foreach", "capturable", "differentiable", "fused"),
    "sophia_g": ("maximize", "foreach", "capturable", "mu_dtype", "hessian_dtype"),
    "sophia_h": ("mu_dtype", "foreach", "capturable", "hessian_dtype"),
    "flat_sophia": ("mask_source", "mask_seed", "mu_dtype", "foreach", "capturable", "hessian_dtype"),
    "soap": ("data_format",),
}


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": [params[0], params[2]]}, {"params": [params[1]], "weight_decay": 0.0, "lr": 5e-3}]


def _make(name: str, seed: int = 0):
    params = _params(seed)
    return params, OPTIMIZERS[name].cls(_groups(params), **KWARGS[name])


def _params_of(opt) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


def _train(name: str, opt, start: int, steps: int) -> None:
    """Deterministic gradients (and Hessian estimates every 3rd step), keyed by the step index, for
    the parameters with ``requires_grad``."""
    spec = OPTIMIZERS[name]
    params = _params_of(opt)
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
        if spec.is_second_order and t % 3 == 0:
            assert opt.update_hessian([torch.randn(p.shape, generator=g) for p in opt.hessian_params()])
        opt.step()


def _flat_state(opt) -> dict[str, object]:
    """Every state value by (parameter index, key); lists (SOAP's factors) flattened."""
    index = {id(p): i for i, p in enumerate(_params_of(opt))}
    out = {}
    for p, st in opt.state.items():
        for key, value in st.items():
            values = value if isinstance(value, list) else [value]
            for j, v in enumerate(values):
                out[f"{index[id(p)]}/{key}/{j}"] = v
    return out


def _assert_same(opt_a, opt_b) -> None:
    """Bit-identical parameters and state (every tensor, dtypes included)."""
    for a, b in zip(_params_of(opt_a), _params_of(opt_b), strict=True):
        assert torch.equal(a, b)
    sa, sb = _flat_state(opt_a), _flat_state(opt_b)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        x, y = sa[key], sb[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), key
        else:
            assert x == y, key


def _snapshot(opt):
    return [p.detach().clone() for p in _params_of(opt)], copy.deepcopy(_flat_state(opt))


def _assert_unchanged(opt, snapshot) -> None:
    params, state = snapshot
    for p, q in zip(_params_of(opt), params, strict=True):
        assert torch.equal(p, q)
    now = _flat_state(opt)
    assert now.keys() == state.keys()
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(now[key], value), key
        else:
            assert now[key] == value, key


def _copy_into(opt_src, opt_dst) -> None:
    with torch.no_grad():
        for a, b in zip(_params_of(opt_src), _params_of(opt_dst), strict=True):
            b.copy_(a)


# ----------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_in_lockstep(name):
    _, a = _make(name)
    _train(name, a, 0, 7)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    _, b = _make(name, seed=1)
    _copy_into(a, b)
    b.load_state_dict(torch.load(buf, weights_only=True))
    _assert_same(a, b)
    _train(name, a, 7, 6)
    _train(name, b, 7, 6)
    _assert_same(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_with_plain_number_steps_loads_and_continues(name):
    """Older torch optimizers and many checkpoints store ``step`` as a plain number."""
    _, a = _make(name)
    _train(name, a, 0, 5)
    sd = copy.deepcopy(a.state_dict())
    for i, st in enumerate(sd["state"].values()):
        st["step"] = int(st["step"]) if i % 2 else float(st["step"])
    _, b = _make(name, seed=1)
    _copy_into(a, b)
    b.load_state_dict(sd)
    assert all(torch.is_tensor(st["step"]) for st in b.state.values())
    _train(name, a, 5, 4)
    _train(name, b, 5, 4)
    _assert_same(a, b)


def _strip_later_options(name: str, opt) -> None:
    for d in (opt.defaults, *opt.param_groups):
        for key in LATER_OPTIONS[name]:
            d.pop(key, None)


@pytest.mark.parametrize("name", NAMES)
def test_old_pickle_and_state_dict_without_later_options(name):
    """A pickle, or a state_dict, written before an option existed loads with the option's default."""
    _, a = _make(name)
    _train(name, a, 0, 4)
    old = copy.deepcopy(a)
    _strip_later_options(name, old)
    assert all(key not in group for group in old.param_groups for key in LATER_OPTIONS[name])
    restored = pickle.loads(pickle.dumps(old))  # __setstate__
    assert restored.param_groups == [
        {**g, "params": r["params"]} for g, r in zip(a.param_groups, restored.param_groups, strict=True)
    ]
    _, b = _make(name, seed=1)
    _copy_into(a, b)
    sd = copy.deepcopy(a.state_dict())
    for group in sd["param_groups"]:
        for key in LATER_OPTIONS[name]:
            group.pop(key, None)
    b.load_state_dict(sd)
    assert [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in a.param_groups
    ]
    for opt in (a, restored, b):
        _train(name, opt, 4, 4)
    _assert_same(a, restored)
    _assert_same(a, b)


# ---------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_fire(name):
    _, opt = _make(name)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd_post", o)))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load_pre", o)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o)))
    _train(name, opt, 0, 2)
    opt.load_state_dict(opt.state_dict())
    assert [c for c, o in calls] == ["pre", "post", "pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]
    assert all(o is opt for _, o in calls)


# ------------------------------------------------------------------------------- deepcopy
@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_continues_like_the_original(name):
    _, a = _make(name)
    _train(name, a, 0, 5)
    b = copy.deepcopy(a)
    shared = {t.data_ptr() for t in _flat_state(a).values() if isinstance(t, torch.Tensor)}
    assert not shared & {t.data_ptr() for t in _flat_state(b).values() if isinstance(t, torch.Tensor)}
    _train(name, a, 5, 5)
    _train(name, b, 5, 5)
    _assert_same(a, b)


# ---------------------------------------------------------------------- param-group changes
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_then_step_equals_building_with_it(name):
    params = _params()
    a = OPTIMIZERS[name].cls([_groups(params)[0]], **KWARGS[name])
    _train(name, a, 0, 3)  # the first group has state already
    a.add_param_group(_groups(params)[1])
    twins = _params()
    b = OPTIMIZERS[name].cls(_groups(twins), **KWARGS[name])
    b.param_groups[1]["params"][0].requires_grad_(False)  # no gradient (and no estimate) yet
    _train(name, b, 0, 3)
    b.param_groups[1]["params"][0].requires_grad_(True)
    start = params[1].detach().clone()
    _train(name, a, 3, 4)
    _train(name, b, 3, 4)
    _assert_same(a, b)
    assert not torch.equal(params[1], start)
    assert a.param_groups[1]["lr"] == 5e-3 and a.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", OURS)
def test_add_param_group_validates_the_group(name):
    _, opt = _make(name)
    extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 2  # the bad group was not kept
    opt.add_param_group({"params": [extra], "lr": 1.0})
    assert len(opt.param_groups) == 3


# -------------------------------------------------------------------- zero_grad, no grads
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_both_ways(name):
    params, opt = _make(name)
    _train(name, opt, 0, 1)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads, strict=True))
    opt.zero_grad()  # set_to_none=True is the default
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_changes_nothing(name):
    params, opt = _make(name)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert len(opt.state) == 0 and all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    _train(name, opt, 0, 3)
    opt.zero_grad()
    snapshot = _snapshot(opt)
    opt.step()
    _assert_unchanged(opt, snapshot)


# --------------------------------------------------------------------------------- repr
@pytest.mark.parametrize("name", NAMES)
def test_repr_shows_every_group_option(name):
    _, opt = _make(name)
    text = repr(opt)
    assert text.startswith(type(opt).__name__)
    for i, group in enumerate(opt.param_groups):
        block = text.split(f"Parameter Group {i}\n")[1].split("Parameter Group")[0]
        for key, value in group.items():
            if key != "params":
                assert f"    {key}: {value}\n" in block, (key, block)
    assert "lr: 0.005" in text.split("Parameter Group 1")[1]


# ------------------------------------------------------------------------- options, inputs
@pytest.mark.parametrize("name", NAMES)
def test_unknown_or_unsupported_options_raise_type_error(name):
    cls = OPTIMIZERS[name].cls
    with pytest.raises(TypeError, match="wieght_decay"):
        cls(_params(), wieght_decay=0.5)
    if "maximize" not in inspect.signature(cls.__init__).parameters:
        with pytest.raises(TypeError, match="maximize"):
            cls(_params(), maximize=True)
        return
    # Where maximize is offered, it goes uphill: the first step moves along +grad, not -grad.
    p = torch.nn.Parameter(torch.zeros(3))
    extra = {"bs": 1} if "bs" in inspect.signature(cls.__init__).parameters else {}
    opt = cls([p], lr=0.1, weight_decay=0.0, maximize=True, **extra)
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    opt.step()
    assert torch.equal(torch.sign(p.detach()), torch.tensor([1.0, -1.0, 1.0]))


def _refused(name, opt, params, call, error, match) -> None:
    """``call()`` raises and leaves parameters and state bit-identical."""
    snapshot = _snapshot(opt)
    with pytest.raises(error, match=match):
        call()
    _assert_unchanged(opt, snapshot)


@pytest.mark.parametrize("name", OURS)
def test_complex_parameter_is_refused_before_anything_changes(name):
    cls = OPTIMIZERS[name].cls
    real = _params()
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = cls([{"params": real}, {"params": [z]}], **KWARGS[name])
    z.requires_grad_(False)  # the real parameters first get state of their own
    _train(name, opt, 0, 3)
    z.requires_grad_(True)
    for p in real:
        p.grad = torch.ones_like(p)
    z.grad = torch.ones_like(z)
    _refused(name, opt, real, opt.step, RuntimeError, f"{type(opt).__name__} does not support complex parameters")


@pytest.mark.parametrize("name", OURS)
def test_sparse_gradient_is_refused_before_anything_changes(name):
    cls = OPTIMIZERS[name].cls
    emb = torch.nn.Embedding(5, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(4))
    opt = cls([{"params": [dense]}, {"params": emb.parameters()}], **KWARGS[name])
    for _ in range(3):  # state for the dense parameter first
        dense.grad = torch.randn(4)
        opt.step()
    dense.grad = torch.randn(4)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    _refused(name, opt, [dense], opt.step, RuntimeError, f"{type(opt).__name__} does not support sparse gradients")


@pytest.mark.parametrize("bs", [0, -4, float("nan"), float("inf"), True, "64"])
def test_bad_bs_is_refused_before_anything_changes(bs):
    params, opt = _make("sophia_g")
    _train("sophia_g", opt, 0, 2)
    for p in params:
        p.grad = torch.ones_like(p)
    _refused("sophia_g", opt, params, lambda: opt.step(bs=bs), ValueError, "Invalid bs")


# ------------------------------------------------------------------ torch.optim conventions
def _lr_run(name, lr, new_lr=None) -> tuple:
    """Three steps at ``lr``, then (``new_lr``) the first group's rate changed as a scheduler would
    (a tensor in place, anything else by assignment), then three more."""
    params = _params()
    opt = OPTIMIZERS[name].cls(_groups(params), **(KWARGS[name] | {"lr": lr}))
    _train(name, opt, 0, 3)
    if new_lr is not None:
        group = opt.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(new_lr)
        else:
            group["lr"] = new_lr
    _train(name, opt, 3, 3)
    return opt


@pytest.mark.parametrize("name", OURS)
def test_tensor_and_numpy_learning_rates_act_as_the_float_they_hold(name):
    """As torch.optim: a 1-element tensor learning rate (updated in place, as schedulers do) and a
    NumPy scalar give the run of the Python float they hold, bit for bit."""
    first, then = torch.tensor(2e-2), torch.tensor(7e-3)  # float32 values: not the decimal ones
    want = _lr_run(name, first.item(), then.item())
    _assert_same(want, _lr_run(name, first.clone(), then.item()))
    _assert_same(want, _lr_run(name, torch.tensor([first.item()]), then.item()))  # 1 element, 1-d
    _assert_same(want, _lr_run(name, np.float32(first.item()), np.float32(then.item())))
    other = _lr_run(name, 3e-2, then.item())
    assert not torch.equal(_params_of(want)[0], _params_of(other)[0])  # the rate does matter here


@pytest.mark.parametrize(
    "lr, shown",
    [
        (torch.tensor([1e-2, 2e-2]), r"a tensor of shape \(2,\)"),
        (torch.tensor(1), r"a tensor of shape \(\) and dtype torch.int64"),
        (torch.tensor(-1e-2), "-0.0099"),
        (torch.tensor(float("nan")), "nan"),
        (np.float32(-1.0), "-1.0"),
    ],
)
@pytest.mark.parametrize("name", OURS)
def test_bad_tensor_or_numpy_learning_rate_is_refused(name, lr, shown):
    with pytest.raises(ValueError, match=f"Invalid learning rate: {shown}"):
        OPTIMIZERS[name].cls(_params(), lr=lr)


@pytest.mark.parametrize("name", NAMES)
def test_capturable_false_is_accepted_and_true_says_what_to_use(name):
    """``capturable`` (torch.optim's and the Sophia authors' keyword): where a class takes it,
    ``False`` is the plain step; ours refuse ``True`` naming torch.compile."""
    cls = OPTIMIZERS[name].cls
    if "capturable" not in inspect.signature(cls.__init__).parameters:
        with pytest.raises(TypeError, match="capturable"):
            cls(_params(), capturable=False)
        return
    params = _params()
    opt = cls(_groups(params), **KWARGS[name], capturable=False)
    _train(name, opt, 0, 4)
    _, plain = _make(name)
    _train(name, plain, 0, 4)
    _assert_same(opt, plain)
    if name in OURS:
        with pytest.raises(ValueError, match=r"Invalid capturable: True .*torch\.compile\(optimizer\.step\)"):
            cls(_params(), **KWARGS[name], capturable=True)
        with pytest.raises(ValueError, match="Invalid capturable"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "capturable": True})
        assert len(opt.param_groups) == 2
