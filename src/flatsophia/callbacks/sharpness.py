"""Sharpness of the loss landscape during training: top Hessian eigenvalue and Hessian trace.

Both are measured on one FIXED held-out batch with Hessian-vector products (reverse-over-reverse
differentiation, ``torch.autograd.grad`` twice):

* ``top_eig``: the largest eigenvalue ``lambda_max`` (the usual "sharpness"), by power iteration on
  ``v -> H v`` from a seeded random start vector: the Rayleigh quotient ``v^T H v`` of the last unit
  iterate. Power iteration finds the eigenvalue of largest magnitude; if that one is negative, a
  second power iteration on ``H - top_eig * I`` gives ``lambda_max``.
* ``trace``: Hutchinson's estimate ``mean_k v_k^T H v_k`` with Rademacher probes ``v_k``.

:func:`hessian_top_eig_and_trace` is plain PyTorch; :class:`SharpnessCallback` runs it from a
Lightning ``Trainer`` on ``pl_module.net`` / ``pl_module.loss_fn`` and logs ``sharpness/top_eig``
and ``sharpness/trace``. Neither touches ``.grad``, the module's train/eval modes (restored) or the
global random number generators (probes come from a private ``torch.Generator``), so a run with
the callback follows the same trajectory as one without.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from flatsophia.hessian.base import math_attention

log = logging.getLogger(__name__)

__all__ = ["SharpnessCallback", "hessian_top_eig_and_trace"]


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b)))


def _norm(a: Sequence[torch.Tensor]) -> float:
    return _dot(a, a) ** 0.5


def _power_iteration(op, start: list[torch.Tensor], n: int, tol: float) -> float:
    """Rayleigh quotient ``v^T op(v)`` of the last unit iterate of ``n`` power-iteration steps."""
    norm = _norm(start)
    v = [t / norm for t in start]
    value = float("nan")
    for _ in range(n):
        ov = op(v)
        new = _dot(v, ov)
        converged = tol > 0 and abs(new - value) <= tol * abs(new)
        value = new
        norm = _norm(ov)
        if norm == 0.0 or converged:
            break
        v = [t / norm for t in ov]
    return value


def hessian_top_eig_and_trace(
    net: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    n_power_iters: int = 20,
    n_hutchinson: int = 10,
    seed: int = 0,
    params: Sequence[torch.Tensor] | None = None,
    tol: float = 0.0,
    eval_mode: bool = True,
    math_sdpa: bool = True,
) -> tuple[float, float]:
    """Top Hessian eigenvalue (power iteration) and Hutchinson trace of ``loss_fn(net(x), y)``.

    Args:
        net: the network (the Hessian is taken w.r.t. ``params``, default: its trainable parameters).
        loss_fn: ``loss_fn(net(x), y) -> scalar``.
        x, y: the batch (already on the network's device).
        n_power_iters: Hessian-vector products of the power iteration (0 skips it: ``top_eig`` is nan);
            twice as many when the eigenvalue of largest magnitude is negative (see below).
        n_hutchinson: Rademacher probes of the trace estimate (0 skips it: ``trace`` is nan).
        seed: seed of the private generator of the start vector and the probes (same seed, same draws).
        params: parameters to differentiate w.r.t.; default every parameter with ``requires_grad``.
        tol: stop the power iteration early once the relative change of the Rayleigh quotient is
            below ``tol`` (0: always run ``n_power_iters`` products).
        eval_mode: put ``net`` in eval mode for the measurement (no dropout, BatchNorm running stats);
            each submodule's mode is restored afterwards.
        math_sdpa: force the math kernel of scaled-dot-product attention (the only one with double
            backward).

    Returns:
        ``(top_eig, trace)`` as Python floats: ``top_eig`` estimates the largest (algebraic)
        eigenvalue ``lambda_max``. Power iteration finds the eigenvalue of largest magnitude; when
        that one is negative (away from a minimum), a second power iteration on the shifted
        ``H - top_eig * I`` finds ``lambda_max``. Parameters the loss reaches only linearly or not at
        all have zero Hessian rows; they are left out (they change neither value).

    ``.grad`` of the parameters is not touched and the global RNGs are not used.
    """
    for name, value in (("n_power_iters", n_power_iters), ("n_hutchinson", n_hutchinson)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 0)")
    params = [p for p in net.parameters() if p.requires_grad] if params is None else list(params)
    modes = {m: m.training for m in net.modules()}
    if eval_mode:
        net.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), math_attention(math_sdpa):
            loss = loss_fn(net(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:
                return 0.0, 0.0
            g_live = [grads[i] for i in live]
            p_live = [params[i] for i in live]
            gen = torch.Generator().manual_seed(int(seed))  # CPU draws, moved: same numbers on any device

            def hvp(vs: list[torch.Tensor]) -> list[torch.Tensor]:
                out = torch.autograd.grad(g_live, p_live, grad_outputs=vs, retain_graph=True, allow_unused=True)
                return [torch.zeros_like(v) if h is None else h.detach() for v, h in zip(vs, out)]

            top_eig = float("nan")
            if n_power_iters:
                start = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) for p in p_live]
                top_eig = _power_iteration(hvp, start, n_power_iters, tol)
                if top_eig < 0:
                    # The dominant eigenvalue is negative: iterate on H - top_eig * I, whose dominant
                    # eigenvalue is lambda_max - top_eig >= 0.
                    shift = top_eig

                    def shifted(vs: list[torch.Tensor]) -> list[torch.Tensor]:
                        return [h - shift * v for h, v in zip(hvp(vs), vs)]

                    top_eig = _power_iteration(shifted, start, n_power_iters, tol) + shift

            trace = float("nan")
            if n_hutchinson:
                total = 0.0
                for _ in range(n_hutchinson):
                    v = [torch.randint(0, 2, p.shape, generator=gen).to(p).mul_(2).sub_(1) for p in p_live]
                    total += _dot(v, hvp(v))
                trace = total / n_hutchinson
            return top_eig, trace
    finally:
        for m, training in modes.items():
            m.training = training


def _restore_rng(fn: Callable[[], object], device: torch.device) -> object:
    """Run ``fn`` and put every global RNG (torch CPU and accelerator, numpy, random) back as it was."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=devices):
            return fn()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _take_examples(loader, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples (``None``: the first batch) of ``loader``, as one ``(x, y)`` batch."""
    if isinstance(loader, DataLoader) and loader.num_workers > 0 and loader.batch_size is not None:
        # the same batches without starting worker processes for a few examples
        loader = DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, collate_fn=loader.collate_fn
        )
    xs, ys, have = [], [], 0
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise ValueError(f"SharpnessCallback expects (x, y) batches; got {type(batch).__name__}")
        xs.append(batch[0])
        ys.append(batch[1])
        have += len(batch[0])
        if n is None or have >= n:
            break
    if not xs:
        raise ValueError("SharpnessCallback: the validation dataloader is empty")
    x, y = torch.cat(xs), torch.cat(ys)
    return (x, y) if n is None else (x[:n], y[:n])


class SharpnessCallback(L.Callback):
    """Log the top Hessian eigenvalue and the Hessian trace on a fixed held-out batch.

    The batch is taken once at fit start: the first ``batch_size`` examples of the datamodule's
    ``val_dataloader()`` (falling back to the module's or the trainer's validation loader), unless
    ``batch=(x, y)`` is given. Every ``every_n_steps`` optimizer steps (``trainer.global_step``), at
    the end of training and (``on_validation=True``) after every validation run, it computes
    :func:`hessian_top_eig_and_trace` on ``pl_module.net`` (the module itself if it has no ``net``)
    with ``pl_module.loss_fn`` and logs ``sharpness/top_eig`` and ``sharpness/trace`` to every
    logger with ``step=trainer.global_step`` (the number of optimizer steps taken; Lightning's own
    rows use the batch index, one less with ``module.accumulate=1``).
    A step is measured at most once. The values also go to ``trainer.callback_metrics`` and to
    ``self.history`` (a list of ``{"step", "top_eig", "trace"}``).

    Cost per measurement: one forward, one backward with ``create_graph`` and
    ``n_power_iters + n_hutchinson`` Hessian-vector products (each about two backward passes).

    Args:
        every_n_steps: measure when ``global_step`` is a positive multiple of this (0: never by step).
        n_power_iters: power-iteration steps of the top eigenvalue.
        n_hutchinson: Rademacher probes of the trace.
        batch_size: examples in the fixed batch (``None``: the first validation batch as it is).
        seed: seed of the private generator (the same start vector and probes at every measurement).
        on_validation: also measure after every validation run (not the sanity check).
        batch: an explicit ``(x, y)`` batch instead of the validation loader's.
        math_sdpa: force the math attention kernel (flash/memory-efficient have no double backward).
    """

    METRICS = ("sharpness/top_eig", "sharpness/trace")

    def __init__(
        self,
        every_n_steps: int = 100,
        n_power_iters: int = 20,
        n_hutchinson: int = 10,
        batch_size: int | None = 256,
        seed: int = 0,
        on_validation: bool = False,
        batch: tuple[torch.Tensor, torch.Tensor] | None = None,
        math_sdpa: bool = True,
    ):
        super().__init__()
        checks = (
            ("every_n_steps", every_n_steps, 0),
            ("n_power_iters", n_power_iters, 0),
            ("n_hutchinson", n_hutchinson, 0),
            ("seed", seed, None),
        )
        for name, value, minimum in checks:
            if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
                raise ValueError(f"Invalid SharpnessCallback {name}: {value!r} (expected an integer >= {minimum})")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"Invalid SharpnessCallback batch_size: {batch_size!r} (expected null or an integer >= 1)")
        if n_power_iters == 0 and n_hutchinson == 0:
            raise ValueError("SharpnessCallback: n_power_iters and n_hutchinson are both 0; nothing to measure")
        if batch is not None and (not isinstance(batch, (list, tuple)) or len(batch) != 2):
            raise ValueError("SharpnessCallback batch must be an (x, y) pair")
        self.every_n_steps = every_n_steps
        self.n_power_iters = n_power_iters
        self.n_hutchinson = n_hutchinson
        self.batch_size = batch_size
        self.seed = seed
        self.on_validation = on_validation
        self.math_sdpa = math_sdpa
        self._given = batch
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._last_step: int | None = None

    # ------------------------------------------------------------------ batch
    def _val_loader(self, trainer: L.Trainer, pl_module: L.LightningModule):
        dm = trainer.datamodule
        if dm is not None and type(dm).val_dataloader is not L.LightningDataModule.val_dataloader:
            return dm.val_dataloader()
        if type(pl_module).val_dataloader is not L.LightningModule.val_dataloader:
            return pl_module.val_dataloader()
        loaders = trainer.val_dataloaders
        if loaders is None:  # loaded lazily by Lightning; ask its data source (private API)
            try:
                loaders = trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
            except Exception:
                loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if loaders is None:
            raise ValueError(
                "SharpnessCallback found no validation dataloader to take its fixed batch from; "
                "give the trainer a datamodule with val_dataloader() or pass batch=(x, y)"
            )
        return loaders

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "loss_fn", None)):
            raise TypeError(
                f"SharpnessCallback needs pl_module.loss_fn(logits, y) (as OptimLitModule has); "
                f"{type(pl_module).__name__} has none"
            )
        device = pl_module.device
        if self._given is not None:
            x, y = self._given
            if self.batch_size is not None:
                x, y = x[: self.batch_size], y[: self.batch_size]
        else:
            x, y = _restore_rng(lambda: _take_examples(self._val_loader(trainer, pl_module), self.batch_size), device)
        self.batch = (x.to(device), y.to(device))
        self._last_step = None
        log.info("SharpnessCallback: fixed batch of %d examples", len(self.batch[0]))

    # ------------------------------------------------------------ measurement
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """Compute and log both values at the current ``global_step`` (once per step)."""
        step = int(trainer.global_step)
        if self.batch is None or step == self._last_step or trainer.sanity_checking:
            return None
        self._last_step = step
        x, y = self.batch

        def run():
            return hessian_top_eig_and_trace(
                getattr(pl_module, "net", pl_module),
                pl_module.loss_fn,
                x,
                y,
                n_power_iters=self.n_power_iters,
                n_hutchinson=self.n_hutchinson,
                seed=self.seed,
                math_sdpa=self.math_sdpa,
            )

        top_eig, trace = _restore_rng(run, pl_module.device)
        metrics = {}
        if self.n_power_iters:
            metrics["sharpness/top_eig"] = top_eig
        if self.n_hutchinson:
            metrics["sharpness/trace"] = trace
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.history.append({"step": step, "top_eig": top_eig, "trace": trace})
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.measure(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.on_validation and trainer.state.fn == "fit":
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.measure(trainer, pl_module)
