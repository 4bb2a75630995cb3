"""The training pass's precision, recorded, and the Hessian-vector product chosen from it.

Oracle: the exact ``v * (H v)`` (torch.func, float64 arithmetic at the same float32 weights, the
training pass's dropout masks). A finite difference reusing a bf16-autocast gradient is off by a
relative ~1-7 (docs/results/hvp_precision); recomputed in float32 it is within 1e-2.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_finite_difference import _ce, _exact_v_hv, _flat, _rel
from torch import nn

from _spawn import spawn
from flatsophia.experiments import hvp_precision as study
from flatsophia.hessian import HessianRefresher, Hutchinson
from flatsophia.hessian import precision as prec
from flatsophia.hessian.base import capture_rng_state
from flatsophia.hessian.precision import TrainingPrecision, choose_hvp, full_precision, record_precision
from flatsophia.modules.optim_module import resolve_hvp
from flatsophia.optim import SophiaH

FD = "finite_difference"
BF16, FP16 = torch.bfloat16, torch.float16
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
]


def _net(conv=False):
    torch.manual_seed(0)
    if conv:
        return nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 3)).train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


@pytest.fixture
def on_cuda(monkeypatch):
    """The parameters' device types as seen by record_precision: CUDA (TF32 is a CUDA setting),
    and the global TF32 flags put back afterwards."""
    monkeypatch.setattr(prec, "_device_types", lambda params: ["cuda"])
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn


def test_records_autocast_half_parameters_and_full_precision():
    net, x = _net(), torch.randn(4, 6)
    assert record_precision(net.parameters(), net) == TrainingPrecision()
    assert record_precision(net.parameters(), net).full
    for dtype in (BF16, FP16):
        with torch.autocast("cpu", dtype=dtype):
            recorded = record_precision(net.parameters(), net)
        assert recorded.autocast == dtype and not recorded.full
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert record_precision(net.parameters(), net).full
    half = copy.deepcopy(net).to(BF16)
    assert record_precision(half.parameters(), half).param_dtype == BF16
    # read where the forward runs: a training pass that enters autocast inside the wrapped block
    opt = SophiaH(net.parameters(), lr=1e-3)
    refresher = HessianRefresher(opt, model=net, every_k=1, hvp=FD)
    with warnings.catch_warnings(record=True), refresher.training_pass(0):
        with torch.autocast("cpu", dtype=FP16):
            out = net(x)
        out.float().sum().backward()
    assert refresher._pass.precision.autocast == FP16


def test_records_tf32_on_cuda_only(on_cuda):
    net, conv = _net(), _net(conv=True)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = False
    assert record_precision(net.parameters(), net).tf32_matmul
    assert "TF32 matmuls" in record_precision(net.parameters(), net).describe()
    torch.set_float32_matmul_precision("highest")
    assert record_precision(net.parameters(), net).full
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: matters only to a model with convolutions
    assert record_precision(net.parameters(), net).full
    assert record_precision(conv.parameters(), conv).tf32_conv
    with full_precision(["cuda"]):
        assert record_precision(conv.parameters(), conv).full
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.backends.cudnn.allow_tf32  # restored
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("high")
    with pytest.raises(RuntimeError, match="cannot run with TF32 matmuls"):  # the estimator's own check
        Hutchinson(hvp=FD).finite_difference([torch.zeros(16, 6), None, None, None], None, None, list(net.parameters()))


@pytest.mark.parametrize(
    ("recorded", "unsharded", "sharded"),
    [
        (TrainingPrecision(), FD, FD),
        (TrainingPrecision(autocast=BF16), "autograd", FD),
        (TrainingPrecision(autocast=FP16), "autograd", FD),
        (TrainingPrecision(tf32_matmul=True), "autograd", FD),
        (TrainingPrecision(tf32_conv=True), "autograd", FD),
        (TrainingPrecision(param_dtype=BF16, fsdp_policy=True), "autograd", ValueError),
    ],
)
def test_auto_rule_per_precision(recorded, unsharded, sharded):
    assert choose_hvp(recorded) == unsharded
    if sharded is ValueError:
        with pytest.raises(ValueError, match="param_dtype.*bfloat16.*SophiaG"):
            choose_hvp(recorded, sharded=True)
    else:
        assert choose_hvp(recorded, sharded=True) == sharded


@pytest.mark.parametrize(
    ("precision", "expected"), [("32-true", FD), ("bf16-mixed", "autograd"), ("16-mixed", "autograd")]
)
def test_template_resolves_auto_with_the_library_rule(on_cuda, precision, expected):
    torch.set_float32_matmul_precision("highest")
    net = _net()
    assert resolve_hvp("auto", "hutchinson", precision, net) == expected
    assert resolve_hvp("auto", "gnb", precision, net) == "autograd"
    assert resolve_hvp(FD, "hutchinson", precision, net) == FD
    torch.set_float32_matmul_precision("high")  # TF32 on CUDA: reduced whatever Lightning's setting
    assert resolve_hvp("auto", "hutchinson", precision, net) == "autograd"
    assert resolve_hvp("auto", "hutchinson", precision, net, sharded=True) == FD


def _refreshes(hvp, autocast, steps=3, seed=4):
    """A loop whose training pass runs under ``autocast`` (or not) and whose refresh runs outside
    it (the refresher's docstring loop); each step's estimate, its exact counterpart (same probe,
    same dropout masks), and the warnings."""
    net = _net()
    x, y = _batch()
    loss_fn = _ce(y)
    opt = SophiaH(net.parameters(), lr=1e-3)
    refresher = HessianRefresher(opt, model=net, every_k=1, seed=seed, **({} if hvp == "auto" else {"hvp": hvp}))
    twin = Hutchinson(seed=seed)
    params = list(net.parameters())
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            state = capture_rng_state()
            with refresher.training_pass(step):
                with torch.autocast("cpu", dtype=BF16, enabled=autocast):
                    loss = loss_fn(net(x))
                loss.backward()
            d = _flat(refresher.estimate(lambda: net(x), loss_fn))
            vs = [twin.probe(p) for p in params]
            out.append((d, _exact_v_hv(net, x, loss_fn, vs, state)))
            opt.zero_grad()
    return refresher, out, [w for w in caught if issubclass(w.category, UserWarning)]


def test_explicit_finite_difference_after_bf16_pass_recomputes_in_float32_with_one_warning():
    refresher, out, caught = _refreshes(FD, autocast=True)
    assert refresher.finite_difference
    assert len(caught) == 1 and "bfloat16 autocast" in str(caught[0].message)
    assert "float32" in str(caught[0].message)
    for d, exact in out:
        assert _rel(d, exact) < 1e-2, _rel(d, exact)


def test_auto_follows_the_recorded_precision():
    refresher, out, caught = _refreshes("auto", autocast=False)
    assert refresher.finite_difference and not caught  # float32 pass: the finite difference, reused
    for d, exact in out:
        assert _rel(d, exact) < 1e-2, _rel(d, exact)
    refresher, out, caught = _refreshes("auto", autocast=True, steps=1)
    assert not refresher.finite_difference and refresher.estimator.hvp == "autograd" and not caught
    assert refresher.estimator.math_sdpa
    assert not refresher._pass  # the bf16 gradient is not kept for a finite difference
    assert refresher.shares_forward(1)


def test_measured_tf32_error_is_above_the_noise_threshold_when_reusing():
    """A small run of the study: TF32 (emulated) rounding of the training gradient makes the
    reusing finite difference fail the acceptance threshold; recomputing in float32 passes."""
    problem = study.PROBLEMS["mlp"](0)
    result = study.measure(problem, ["float32", "tf32"], probes=2)
    noise, rows = result["noise_1"], result["precisions"]
    limit = study.ACCEPT * noise
    assert rows["tf32"]["fd_reuse"]["err_1"] > limit > rows["tf32"]["fd_float32"]["err_1"]
    assert rows["tf32"]["autograd_p"]["err_1"] < limit
    assert rows["float32"]["fd_reuse"]["err_1"] < limit
    # the emulation rounds: TF32's double backward differs from float32's, by about TF32's resolution
    assert 1e-5 < rows["tf32"]["autograd_p"]["err_1"] < 1e-2 and rows["float32"]["autograd_p"]["err_1"] < 1e-5


def _sharded_half(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        fully_shard(net, mesh=init_device_mesh("cpu", (world,)), mp_policy=MixedPrecisionPolicy(param_dtype=dtype))
        recorded = record_precision(net.parameters(), net)
        try:
            refresher = HessianRefresher(SophiaH(net.parameters(), lr=1e-3), model=net)
            out[str(dtype)] = (recorded, refresher.estimator.hvp)
        except ValueError as err:
            out[str(dtype)] = (recorded, str(err))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fsdp2_param_dtype_is_recorded_and_refused():
    for out in spawn(_sharded_half):
        recorded, message = out["torch.bfloat16"]
        assert recorded.param_dtype == torch.bfloat16 and recorded.fsdp_policy
        assert "MixedPrecisionPolicy param_dtype" in message and "SophiaG" in message
        recorded, hvp = out["torch.float32"]
        assert recorded.full and hvp == FD


def _sharded_autocast(rank, world):
    """FSDP2 (float32 parameters), every rank on the same batch, the training pass under bf16 autocast:
    hvp=auto stays the finite difference, with both gradients taken in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net, twin_net = _net(), _net()
    fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    x, y = _batch()
    loss_fn = _ce(y)
    refresher = HessianRefresher(SophiaH(net.parameters(), lr=1e-3), model=net, every_k=1, seed=7)
    state = capture_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with refresher.training_pass(0):
            with torch.autocast("cpu", dtype=BF16):
                out = net(x)
            loss_fn(out).backward()
        d = refresher.estimate(lambda: net(x), loss_fn)
    twin = Hutchinson(seed=7)
    exact = _exact_v_hv(twin_net, x, loss_fn, [twin.probe(p) for p in twin_net.parameters()], state)
    full = _flat([t.full_tensor() for t in d])
    return refresher.estimator.hvp, _rel(full, exact), [str(w.message) for w in caught if w.category is UserWarning]


def test_fsdp2_autocast_pass_takes_float32_gradients():
    for hvp, err, caught in spawn(_sharded_autocast):
        assert hvp == FD and not caught
        assert err < 1e-2, err
