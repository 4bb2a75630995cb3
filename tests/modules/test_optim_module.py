"""The training step of OptimLitModule: refresh schedule, accumulation, clipping, non-finite policy."""

from __future__ import annotations

import contextlib
import functools

import lightning as L
import pytest
import torch
from _helpers import DumpState, dataset, loader, make_module, trainer

from flatsophia.hessian import HessianRefresher
from flatsophia.optim import OPTIMIZERS, get_spec


class Spy(L.Callback):
    """Wraps ``pl_module.refresher.<method>`` once the refresher exists: records the optimizer step
    of every call (and runs ``before`` first)."""

    def __init__(self, method: str = "apply", before=None):
        self.method, self.before, self.calls = method, before, []

    def on_train_start(self, trainer, pl_module):
        refresher = pl_module.refresher
        inner = getattr(refresher, self.method)

        def spy(*args, **kwargs):
            self.calls.append(pl_module.global_step)
            if self.before is not None:
                self.before()
            return inner(*args, **kwargs)

        setattr(refresher, self.method, spy)


def _fit(tmp_path, name, steps=None, epochs=None, ds=None, _module=None, callbacks=(), **module_kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    module = _module if _module is not None else make_module(name, **module_kwargs)
    spy = Spy()
    kw = {"max_steps": steps} if steps else {"max_epochs": epochs}
    t = trainer(tmp_path, callbacks=[DumpState(str(tmp_path)), spy, *callbacks], **kw)
    t.fit(module, loader(ds or dataset(n=64)))
    return module, t, spy.calls, torch.load(tmp_path / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_refresh_happens_exactly_at_configured_steps(tmp_path, name):
    module, t, calls, _ = _fit(tmp_path, name, steps=11, hessian={"every_k": 4})
    assert t.global_step == 11
    if OPTIMIZERS[name].hessian == "none":
        assert calls == [] and module.refresher.estimator is None
    else:
        assert calls == [0, 4, 8]
        assert module.hessian_refreshes == 3


def test_accumulation_counts_optimizer_steps_not_batches(tmp_path):
    module, t, calls, _ = _fit(tmp_path, "flat_sophia", epochs=2, accumulate=4, hessian={"every_k": 2})
    # 8 batches per epoch / 4 micro-batches = 2 optimizer steps per epoch.
    assert t.global_step == 4
    assert calls == [0, 2]


def test_sophia_g_bs_counts_predictions_per_step(tmp_path):
    module = make_module("sophia_g", accumulate=2)
    seen = []
    t = trainer(tmp_path, max_steps=2)
    orig = module._optimizer_step

    def wrapped(opt, x, y, loss, preds, *args):
        seen.append(preds)
        return orig(opt, x, y, loss, preds, *args)

    module._optimizer_step = wrapped
    t.fit(module, loader(dataset(n=64)))
    assert seen == [16, 16]  # 8 examples x 2 micro-batches x 1 process


def test_random_refresh_is_reproducible(tmp_path):
    _, _, a, sa = _fit(tmp_path / "a", "flat_sophia", steps=20, hessian={"refresh_prob": 0.3, "seed": 5})
    _, _, b, sb = _fit(tmp_path / "b", "flat_sophia", steps=20, hessian={"refresh_prob": 0.3, "seed": 5})
    _, _, c, _ = _fit(tmp_path / "c", "flat_sophia", steps=20, hessian={"refresh_prob": 0.3, "seed": 6})
    assert a == b and a[0] == 0 and 1 < len(a) < 20
    assert a != c
    for k in sa["params"]:
        assert torch.equal(sa["params"][k], sb["params"][k])


@pytest.mark.parametrize("name", ["adamw", "flat_sophia", "sophia_g"])
def test_nonfinite_skip_drops_the_step_and_leaves_state_untouched(tmp_path, name):
    nan_ds = dataset(n=64, nan_batch=2)
    with pytest.warns(RuntimeWarning, match="non-finite gradient at optimizer step 2"):
        module, t, _, with_nan = _fit(tmp_path / "nan", name, epochs=1, ds=nan_ds)
    assert module.nonfinite_skipped == 1 and t.global_step == 7
    # The same run without the poisoned batch gives bit-identical parameters.
    keep = [i for i in range(64) if not 16 <= i < 24]
    clean_ds = torch.utils.data.TensorDataset(*(tensor[keep] for tensor in dataset(n=64).tensors))
    _, _, _, clean = _fit(tmp_path / "clean", name, epochs=1, ds=clean_ds)
    for k in clean["params"]:
        assert torch.isfinite(with_nan["params"][k]).all()
        assert torch.equal(clean["params"][k], with_nan["params"][k]), k


def test_nonfinite_raise_names_step_and_loss(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 2 \(loss nan\)"):
        _fit(tmp_path, "sophia_h", epochs=1, ds=dataset(n=64, nan_batch=2), nonfinite="raise")


def test_mismatched_estimator_is_an_error(tmp_path):
    from flatsophia.optim.factory import estimator_combinations

    with pytest.raises(ValueError, match="hessian=hutchinson does not fit optimizer=adamw") as err:
        _fit(tmp_path, "adamw", steps=1, hessian={"estimator": "hutchinson"})
    assert f"Valid combinations: {estimator_combinations()}" in str(err.value)
    assert "adamw, soap + none" in str(err.value)
    with pytest.raises(ValueError, match="does not fit optimizer=sophia_g, which needs 'gnb'"):
        _fit(tmp_path, "sophia_g", steps=1, hessian={"estimator": "hutchinson"})


def test_refresher_messages_are_in_config_keys():
    """What the library says in its arguments (estimator=, hvp=) the module says in the keys a
    template user types (hessian=, hessian.hvp=, optimizer=)."""
    import warnings

    from flatsophia.modules.optim_module import refresher_options, resolve_hvp
    from flatsophia.validation import HESSIAN_DEFAULTS

    def options(**hessian):
        return {**HESSIAN_DEFAULTS, **hessian}

    with pytest.warns(UserWarning, match="hessian.every_k/refresh_prob are set but optimizer=adamw"):
        assert refresher_options(options(every_k=3), "none", "adamw")["every_k"] == 10
    with pytest.warns(UserWarning, match="hessian.hvp=finite_difference only applies .* optimizer=sophia_g"):
        assert refresher_options(options(hvp="finite_difference"), "gnb", "sophia_g")["hvp"] == "auto"
    with pytest.raises(ValueError, match="Use hessian.hvp=finite_difference .* or optimizer=sophia_g"):
        refresher_options(options(hvp="autograd"), "hutchinson", "flat_sophia", sharded=True)
    with warnings.catch_warnings(record=True) as record:  # the refresher, given the options, warns no more
        warnings.simplefilter("always")
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        HessianRefresher(opt, **refresher_options(options(every_k=3), "none", "adamw"))
    assert [str(w.message).split(" are set")[0] for w in record] == ["hessian.every_k/refresh_prob"]
    net = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="SophiaG .* In the config: trainer.precision=bf16-mixed"):
        resolve_hvp("auto", "hutchinson", "bf16-true", net, sharded=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accumulate": 0}, "module.accumulate: 0"),
        ({"grad_clip": -1.0}, "module.grad_clip: -1.0"),
        ({"nonfinite": "ignore"}, "module.nonfinite: 'ignore'"),
        ({"task": "regression"}, "task: 'regression'"),
        ({"hessian": {"every_k": 0}}, "hessian.every_k: 0"),
        ({"hessian": {"refresh_prob": 1.5}}, "hessian.refresh_prob: 1.5"),
        ({"hessian": {"estimator": "newton"}}, "hessian.estimator: 'newton'"),
        ({"hessian": {"every": 3}}, "Unknown key hessian.every"),
        ({"scheduler": {"name": "step"}}, "scheduler.name: 'step'"),
        ({"log_stats_every": 0}, "module.log_stats_every: 0"),
        ({"hessian": {"hvp": "fd"}}, "hessian.hvp: 'fd'"),
    ],
)
def test_bad_module_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        make_module("adamw", **kwargs)


def test_refresh_does_not_change_the_step_gradient(tmp_path):
    """The training step's gradient is the same with and without a refresh before the step."""
    module = make_module("flat_sophia")
    opt = module.optimizer_factory(list(module.net.parameters()))
    x, y = dataset(n=8).tensors
    module.loss_fn(module.net(x), y).backward()
    before = [p.grad.clone() for p in module.net.parameters()]
    refresher = HessianRefresher(opt, model=module.net, every_k=3)
    assert refresher.refresh(lambda: module.net(x), lambda out: module.loss_fn(out, y))
    assert refresher.refreshes == 1
    for b, p in zip(before, module.net.parameters()):
        assert torch.equal(b, p.grad)


@pytest.mark.parametrize("name", ["flat_sophia", "sophia_g"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_fused_refresh_matches_separate_refresh(tmp_path, accumulate, name):
    """Sharing the training forward with the refresh (Hutchinson: one more backward through the
    gradient; GNB: labels sampled from the training logits, back-propagated through the same graph)
    changes nothing but the cost."""
    hessian = {"every_k": 3, "hvp": "autograd"}  # a finite difference never shares the forward
    fused_module = make_module(name, accumulate=accumulate, hessian=hessian)
    fused_used = Spy("forward_backward")
    fused_module, _, fused_calls, fused = _fit(
        tmp_path / "f", name, steps=9, accumulate=accumulate, _module=fused_module, callbacks=[fused_used]
    )
    assert fused_calls == [0, 3, 6] and fused_used.calls == [0, 3, 6]
    module = make_module(name, accumulate=accumulate, hessian=hessian)
    module._can_share_forward = lambda: False
    t = trainer(tmp_path / "s", callbacks=[DumpState(str(tmp_path))], max_steps=9)
    t.fit(module, loader(dataset(n=64)))
    separate = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert module.hessian_refreshes == fused_module.hessian_refreshes == 3
    for k in fused["params"]:
        torch.testing.assert_close(fused["params"][k], separate["params"][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["soap", "flat_sophia"])
def test_bf16_mixed_precision_steps_outside_autocast(tmp_path, name):
    """Lightning runs training_step under autocast; SOAP's projections must still be fp32 (its
    state is): before the fix the step failed with a bf16/fp32 dtype mismatch."""
    module = make_module(name)
    before = [p.detach().clone() for p in module.parameters()]
    t = trainer(tmp_path, precision="bf16-mixed", max_steps=5)
    t.fit(module, loader(dataset()))
    assert module.global_step == 5
    state = module.optimizers().optimizer.state
    floats = [v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()]
    assert floats and all(v.dtype == torch.float32 for v in floats)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(module.parameters(), before))


def test_step_time_is_amortised_over_one_refresh_period(tmp_path, monkeypatch):
    """``time/step_ms`` is the mean over the last ``every_k`` steps, so every logged value carries
    one refresh's cost (a per-step time logged every 10 steps would never include a refresh step).

    The module's clock is replaced by a fake one (5 ms per step, +100 ms per refresh), so the
    expected values are exact and a busy machine cannot change them."""
    import types

    from flatsophia.modules import optim_module

    now = [0.0]

    def perf_counter():
        now[0] += 0.005  # each reading advances 5 ms: a step (start -> end) lasts 5 ms
        return now[0] - 0.005

    def slow_refresh():
        now[0] += 0.1

    monkeypatch.setattr(optim_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    module = make_module("sophia_h", hessian={"every_k": 4})
    logged = []
    log = module.log

    def spy(name, value, *args, **kwargs):
        if name == "time/step_ms":
            logged.append(float(value))
        return log(name, value, *args, **kwargs)

    module.log = spy
    refreshes = Spy(before=slow_refresh)
    trainer(tmp_path, callbacks=[refreshes], max_steps=10).fit(module, loader(dataset(n=80)))
    assert refreshes.calls == [0, 4, 8]
    # steps 0-2: growing windows starting at the refresh of step 0; from step 3 on, every 4-step
    # window holds exactly one 100 ms refresh: (105 + 3 * 5) / 4 = 30 ms
    assert logged == pytest.approx([105.0, 55.0, 115 / 3, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0])


@pytest.mark.parametrize(
    ("name", "hessian"),
    [
        ("flat_sophia", {"every_k": 3, "hvp": "autograd"}),
        ("sophia_g", {"every_k": 3}),
        ("flat_sophia", {"refresh_prob": 0.3, "hvp": "autograd"}),
        ("flat_sophia", {"every_k": 3, "hvp": "finite_difference"}),
        ("sophia_h", {"refresh_prob": 0.3, "hvp": "finite_difference"}),
        ("flat_sophia", {"every_k": 3, "hvp": "finite_difference", "batch_fraction": 0.25}),
        ("sophia_h", {"refresh_prob": 0.3, "hvp": "finite_difference", "batch_fraction": 0.3}),
        ("sophia_g", {"every_k": 3, "batch_fraction": 0.5}),
        ("flat_sophia", {"every_k": 3, "hvp": "autograd", "batch_fraction": 0.25}),
    ],
)
def test_plain_loop_with_the_refresher_equals_the_module(tmp_path, name, hessian):
    """The refresher's docstring loop (plain PyTorch, clipping as the module clips) ends with the
    module's parameters, bit for bit: the module adds only Lightning's bookkeeping. With
    ``batch_fraction`` < 1 the refresh runs on the first rows, and a finite-difference step's
    training pass in two chunks (the subset first), as the docstring shows."""
    from flatsophia.optim import param_groups

    module, t, calls, fitted = _fit(tmp_path, name, steps=11, hessian=hessian)
    plain = make_module(name, hessian=hessian)
    net = plain.net
    opt = plain.optimizer_factory(param_groups(net, decay="matrices"))
    refresher = HessianRefresher(opt, model=net, **plain.hessian_cfg)
    refreshed = []
    batches = [batch for _ in range(2) for batch in loader(dataset(n=64))][:11]  # 8 per epoch
    for step, (x, y) in enumerate(batches):
        forward, loss_fn = functools.partial(net, x), functools.partial(plain.loss_fn, y=y)
        estimates = None
        if refresher.shares_forward(step):
            _, estimates = refresher.forward_backward(forward, loss_fn)
        elif refresher.splits(step):
            (sx, sy), (rx, ry) = refresher.split((x, y))
            divisor = len(y) / len(sy)
            with refresher.training_pass(step, loss_divisor=divisor, subset=True):
                (plain.loss_fn(net(sx), sy) / divisor).backward()
            (plain.loss_fn(net(rx), ry) * (len(ry) / len(y))).backward()
        else:
            with refresher.training_pass(step):
                loss_fn(forward()).backward()
        sx, sy = refresher.subset((x, y))
        forward, loss_fn = functools.partial(net, sx), functools.partial(plain.loss_fn, y=sy)
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        share = len(sy) / len(y) if refresher.batch_fraction < 1 else None
        if refresher.maybe_refresh(step, forward, loss_fn, estimates, share=share):
            refreshed.append(step)
        opt.step(**({"bs": len(y)} if name == "sophia_g" else {}))
        opt.zero_grad(set_to_none=True)
    assert refreshed == calls and refresher.refreshes == module.hessian_refreshes == len(calls) >= 3
    for n, p in net.named_parameters():
        assert torch.equal(p, fitted["params"][f"net.{n}"]), n


def test_finite_difference_refresh_at_configured_steps_with_accumulation(tmp_path):
    module, t, calls, _ = _fit(
        tmp_path, "flat_sophia", epochs=2, accumulate=2, hessian={"every_k": 3, "hvp": "finite_difference"}
    )
    assert t.global_step == 8 and calls == [0, 3, 6] and module.hessian_refreshes == 3
    assert module.refresher.finite_difference and module.refresher.skipped == 0


@pytest.mark.parametrize("fraction", [1, 0.25])
def test_finite_difference_in_mixed_precision_recomputes_in_float32_with_one_warning(tmp_path, fraction):
    """The bf16 training gradient is not reused (docs/results/hvp_precision): each refresh takes both
    gradients in float32, outside Lightning's autocast; one warning for the run. On part of the batch
    too: the split pass's subset chunk records the precision."""
    module = make_module("sophia_h", hessian={"hvp": "finite_difference", "every_k": 1, "batch_fraction": fraction})
    with pytest.warns(UserWarning, match="bfloat16 autocast.*float32") as caught:
        trainer(tmp_path, precision="bf16-mixed", max_steps=3).fit(module, loader(dataset()))
    assert sum("hvp=finite_difference: the training pass" in str(w.message) for w in caught) == 1
    assert module.refresher.finite_difference and module.refresher.refreshes == 3


class _Record(L.Callback):
    """Per step: the batch seen, and the global RNG state after the step (the dropout stream)."""

    def __init__(self):
        self.batches, self.rng = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch[0].clone())
        self.rng.append(torch.get_rng_state())


class _Refresh(L.Callback):
    """``discard``: every estimate is computed and thrown away; ``none``: no refresh at all;
    ``keep``: every estimate is recorded and applied."""

    def __init__(self, mode: str):
        self.mode, self.estimates = mode, []

    def on_train_start(self, trainer, pl_module):
        refresher = pl_module.refresher
        if self.mode == "none":
            refresher.estimator = None
            return
        apply = refresher.apply

        def record(estimates):
            self.estimates.append(estimates)
            return apply(estimates) if self.mode == "keep" else None

        refresher.apply = record


@pytest.mark.parametrize("fraction", [1, 0.25])
def test_discarded_finite_difference_refreshes_leave_the_run_bit_identical(tmp_path, fraction):
    """A run that computes a finite-difference estimate on every step and discards it equals a run
    without refreshes: parameters, BatchNorm buffers, the data order of a shuffled loader over two
    epochs (its seed comes from the global RNG) and the dropout stream of every later step. With
    ``batch_fraction`` < 1 too: a BatchNorm network's training pass is never split (one warning)."""
    from torch import nn

    from flatsophia.modules import OptimLitModule

    runs = {}
    for mode in ("discard", "none"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
        factory = functools.partial(get_spec("sophia_h").cls, lr=1e-2)
        hessian = {"every_k": 1, "hvp": "finite_difference", "batch_fraction": fraction}
        module = OptimLitModule(net, factory, num_classes=3, scheduler={"name": "constant"}, hessian=hessian)
        record, refresh = _Record(), _Refresh(mode)
        torch.manual_seed(1)
        data = torch.utils.data.DataLoader(dataset(n=64), batch_size=8, shuffle=True)
        warns = pytest.warns(UserWarning, match="batch statistics") if fraction < 1 and mode == "discard" else None
        with warns or contextlib.nullcontext():
            trainer(tmp_path / mode, callbacks=[record, refresh], max_epochs=2).fit(module, data)
        runs[mode] = (module, record, refresh)
    (fd, fd_record, fd_refresh), (none, none_record, none_refresh) = runs["discard"], runs["none"]
    assert len(fd_refresh.estimates) == 16 and not none_refresh.estimates
    assert all(torch.isfinite(e).all() for est in fd_refresh.estimates for e in est)
    assert not torch.equal(fd_record.batches[0], fd_record.batches[8])  # shuffled: epochs differ
    assert all(torch.equal(a, b) for a, b in zip(fd_record.batches, none_record.batches, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(fd_record.rng, none_record.rng, strict=True))
    for (n, a), b in zip(fd.named_parameters(), none.parameters()):
        assert torch.equal(a, b), n
    buffers = list(zip(fd.net.buffers(), none.net.buffers(), strict=True))
    assert buffers and all(torch.equal(a, b) for a, b in buffers)


@pytest.mark.parametrize(
    ("name", "precision", "expected"),
    [
        ("flat_sophia", "32-true", "finite_difference"),
        ("sophia_h", "64-true", "finite_difference"),
        ("flat_sophia", "bf16-mixed", "autograd"),
        ("sophia_g", "32-true", None),
    ],
)
def test_hvp_auto_takes_the_finite_difference_in_full_precision(tmp_path, name, precision, expected):
    """``hessian.hvp=auto`` (the default): two gradients where they are exact enough, the double
    backward under half/mixed precision; Gauss-Newton-Bartlett has no Hessian-vector product."""
    module = make_module(name, hessian={"every_k": 3})
    assert module.hessian_cfg["hvp"] == "auto"
    trainer(tmp_path, max_steps=2, precision=precision).fit(module, loader(dataset(n=16)))
    assert getattr(module.refresher.estimator, "hvp", None) == expected
    assert module.refresher.finite_difference == (expected == "finite_difference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_split_training_pass_gives_the_whole_gradient(tmp_path, dtype, accumulate):
    """hessian.batch_fraction < 1 with the finite difference: the refresh step's last micro-batch
    runs as two chunks (the subset, then the rest). The step's gradient is the unsplit one's (at
    batch_fraction=1), and the estimate, reusing the subset chunk's gradient, is the one the refresh
    takes with both of the subset's gradients of its own (the split turned off), to rounding."""
    runs = {}
    for key, fraction in (("split", 0.25), ("whole", 1), ("unsplit", 0.25)):
        module = make_module(
            "sophia_h",
            dtype=dtype,
            accumulate=accumulate,
            hessian={"every_k": 2, "hvp": "finite_difference", "batch_fraction": fraction},
        )
        if key == "unsplit":
            module._split_share = lambda y: None
        seen, splits = _watch_step(module)
        estimates = _Refresh("keep")
        trainer(tmp_path / key, callbacks=[estimates], max_steps=3).fit(module, loader(dataset(n=64, dtype=dtype)))
        runs[key] = seen, estimates.estimates
        assert module.hessian_refreshes == 2 and [n for _, n in seen] == [2 if fraction < 1 else 8] * 3
        assert splits == ([0, 2] if key == "split" else [])
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-15)
    for a, b in zip(runs["split"][0][0][0], runs["whole"][0][0][0], strict=True):
        torch.testing.assert_close(a, b, **tol)
    # the finite difference divides the gradients' rounding by eps (3.5e-4 in float32, 1.5e-8 in float64)
    tol = dict(rtol=2e-2, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9)
    for a, b in zip(runs["split"][1][0], runs["unsplit"][1][0], strict=True):
        torch.testing.assert_close(a, b, **tol)
    assert not torch.allclose(runs["split"][1][0][0], runs["whole"][1][0][0], rtol=1e-2)


def _watch_step(module):
    """Record, per optimizer step, the gradients and the refresh batch's size, and the steps whose
    training pass was split."""
    seen, splits = [], []
    step, split = module._optimizer_step, module._split_backward

    def optimizer_step(opt, x, y, *args, **kwargs):
        seen.append(([p.grad.clone() for p in module.net.parameters()], len(y)))
        return step(opt, x, y, *args, **kwargs)

    def split_backward(*args):
        splits.append(module.global_step)
        return split(*args)

    module._optimizer_step, module._split_backward = optimizer_step, split_backward
    return seen, splits
