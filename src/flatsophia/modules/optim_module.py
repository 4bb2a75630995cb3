"""LightningModule that trains any network with any optimizer of the registry, second-order included.

Manual optimization, so the module owns the whole optimizer step: gradient accumulation over
``accumulate`` micro-batches, clipping, the non-finite policy, the LR scheduler, and the Hessian
refresh every ``hessian.every_k`` optimizer steps (or at random with probability
``hessian.refresh_prob``) with the estimator the optimizer consumes.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from flatsophia.hessian import build_estimator
from flatsophia.hessian.base import math_attention
from flatsophia.optim.factory import param_groups, spec_for
from flatsophia.optim.schedules import warmup_decay
from flatsophia.validation import (
    HESSIAN_DEFAULTS,
    SCHEDULER_DEFAULTS,
    TASKS,
    check_choice,
    check_estimator_fits,
    check_hessian_block,
    check_module_options,
    check_scheduler_block,
    merge_block,
)

log = logging.getLogger(__name__)

def _autocast_off(device: torch.device):
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


def _time_window(hessian_cfg: dict) -> int:
    """Steps averaged by ``time/step_ms``: the refresh period ``every_k`` (10 without one)."""
    k = hessian_cfg.get("every_k")
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 10


class OptimLitModule(L.LightningModule):
    """Classification or language modelling with a pluggable (second-order) optimizer.

    Args:
        net: the network; returns logits ``(B, C)`` or ``(B, T, V)``.
        optimizer: a factory called with parameter groups (Hydra ``_partial_: true``).
        scheduler: ``{name: constant|cosine|linear, warmup_steps, min_lr_ratio, total_steps}``;
            ``total_steps: null`` uses the trainer's number of optimizer steps.
        hessian: ``{estimator: auto|none|gnb|hutchinson, every_k, refresh_prob, distribution,
            n_probes, seed}``; ``auto`` picks the estimator the optimizer consumes.
        task: ``"classification"`` or ``"lm"`` (cross-entropy over the last dim either way).
        num_classes: classes, or vocabulary size for ``lm``.
        grad_clip: max global gradient norm (``None``/0 disables clipping).
        accumulate: micro-batches per optimizer step.
        nonfinite: ``"skip"`` (drop a step whose gradient is NaN/inf, count it and warn) or
            ``"raise"`` (stop with the step and the loss).
        weight_decay_rule: ``"matrices"``, ``"all"`` or ``"none"`` (see ``param_groups``).
        optimizer_name: registry name, used in messages and checkpoints.
        log_stats_every: collect and log optimizer diagnostics every this many optimizer steps.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: dict | None = None,
        hessian: dict | None = None,
        task: str = "classification",
        num_classes: int = 10,
        grad_clip: float | None = 1.0,
        accumulate: int = 1,
        nonfinite: str = "skip",
        weight_decay_rule: str = "matrices",
        optimizer_name: str | None = None,
        log_stats_every: int = 10,
    ):
        super().__init__()
        check_choice("task", task, TASKS)
        check_module_options(accumulate, grad_clip, nonfinite, log_stats_every, weight_decay_rule)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Invalid num_classes: {num_classes!r} (expected an integer >= 2)")
        if not callable(optimizer):
            raise ValueError(f"Invalid optimizer: {optimizer!r} (expected a factory taking parameters)")
        self.hessian_cfg = merge_block("hessian", hessian, HESSIAN_DEFAULTS)
        check_hessian_block(self.hessian_cfg)
        self.scheduler_cfg = merge_block("scheduler", scheduler, SCHEDULER_DEFAULTS)
        check_scheduler_block(self.scheduler_cfg)
        # The optimizer factory is not stored as such: checkpoints stay loadable with
        # torch.load(weights_only=True). Its name and keyword arguments are recorded instead.
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer"])
        self.hparams["optimizer_kwargs"] = dict(getattr(optimizer, "keywords", {}) or {})
        self.automatic_optimization = False
        self.net = net
        self.optimizer_factory = optimizer
        self.task = task
        self.num_classes = num_classes
        self.grad_clip = grad_clip or None
        self.accumulate = accumulate
        self.nonfinite = nonfinite
        self.weight_decay_rule = weight_decay_rule
        self.optimizer_name = optimizer_name or _factory_name(optimizer)
        self.log_stats_every = log_stats_every

        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_loss_best = MinMetric()
        if task == "classification":
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.val_acc_best = MaxMetric()

        # Training-loop state that checkpoints carry (see on_save_checkpoint).
        self.estimator = None
        self.estimator_name = "none"
        # Created on first use: a torch.Generator held by the module breaks ddp_spawn's pickling.
        self._refresh_rng: torch.Generator | None = None
        self._micro = 0
        self._micro_preds = 0
        self._window_start = 0.0
        # Compute times of the last `every_k` optimizer steps: `time/step_ms` is their mean, so it
        # includes the periodic Hessian refresh (a per-step value logged every 10 steps never would).
        self._step_times: collections.deque[float] = collections.deque(maxlen=_time_window(self.hessian_cfg))
        self.nonfinite_skipped = 0
        self.hessian_refreshes = 0
        self.hessian_skipped = 0

    # ----------------------------------------------------------------- model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        groups = param_groups(self.net, decay=self.weight_decay_rule)
        opt = self.optimizer_factory(groups)
        self._setup_estimator(opt)
        total = self.scheduler_cfg["total_steps"] or self._total_optimizer_steps()
        sched = warmup_decay(
            opt,
            total_steps=int(total),
            warmup_steps=int(self.scheduler_cfg["warmup_steps"]),
            decay=self.scheduler_cfg["name"],
            min_lr_ratio=float(self.scheduler_cfg["min_lr_ratio"]),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_optimizer_steps(self) -> int:
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.max_steps is None or trainer.max_steps < 0:
            total = total // self.accumulate  # epoch-based: batches -> optimizer steps
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                "Cannot infer the schedule's length: set trainer.max_steps or trainer.max_epochs, "
                "or scheduler.total_steps"
            )
        return int(total)

    def _setup_estimator(self, opt: torch.optim.Optimizer) -> None:
        needed = getattr(opt, "hessian_estimator", "none")
        spec = spec_for(opt)
        name = spec.name if spec else type(opt).__name__
        asked = self.hessian_cfg["estimator"]
        if asked == "auto":
            asked = needed
            if needed == "none" and (self.hessian_cfg["every_k"] != 10 or self.hessian_cfg["refresh_prob"]):
                warnings.warn(
                    f"hessian.every_k/refresh_prob are set but optimizer {name!r} uses no Hessian "
                    "estimate; they are ignored.",
                    UserWarning,
                    stacklevel=2,
                )
        check_estimator_fits(asked, needed, name)
        self.estimator_name = needed
        kwargs = {"seed": int(self.hessian_cfg["seed"])}
        if needed == "hutchinson":
            kwargs.update(distribution=self.hessian_cfg["distribution"], n_probes=int(self.hessian_cfg["n_probes"]))
        est = build_estimator(needed, **kwargs)
        if self.estimator is not None and est is not None and self.estimator.name == est.name:
            return  # keep a state restored from a checkpoint
        self.estimator = est

    # -------------------------------------------------------------- training
    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self._micro == 0:
            self._window_start = time.perf_counter()
        self._micro += 1
        self._micro_preds += y.numel()
        last = self._micro >= self.accumulate
        estimates = None
        if last and self._can_fuse_refresh():
            loss, estimates = self._backward_with_refresh(opt, x, y)
        else:
            loss = self.loss_fn(self.net(x), y)
            with opt.toggle_model(sync_grad=last):
                self.manual_backward(loss / self.accumulate)
        self._loss_sum = loss.detach() if self._micro == 1 else self._loss_sum + loss.detach()
        if not last:
            return loss.detach()
        preds = self._micro_preds * self.trainer.world_size
        self._micro = self._micro_preds = 0
        self._optimizer_step(opt, x, y, self._loss_sum / self.accumulate, preds, estimates)
        return loss.detach()

    def _can_fuse_refresh(self) -> bool:
        """Whether this optimizer step's Hessian refresh can share the training forward pass.

        Both estimators can: Hutchinson differentiates the training gradient once more, and
        Gauss-Newton-Bartlett samples its labels from the training logits and back-propagates the
        sampled-label loss through the same graph. Only on one process (under DDP the training
        gradient must go through DDP's hooks), without fp16 loss scaling, and for the fixed every-k
        schedule (the random one draws after the non-finite check).
        """
        return (
            self.estimator_name in ("hutchinson", "gnb")
            and self.hessian_cfg["refresh_prob"] is None
            and self.global_step % self.hessian_cfg["every_k"] == 0
            and self.trainer.world_size == 1
            and str(self.trainer.precision) not in ("16-mixed", "16", "16-true")
        )

    def _backward_with_refresh(self, opt, x, y):
        """One forward, the training gradient and the Hessian estimate together (saves a forward)."""
        params = opt.optimizer.hessian_params()
        with math_attention(getattr(self.estimator, "math_sdpa", False)):
            logits = self.net(x)
            loss = self.loss_fn(logits, y)
            grads, estimates = self._run_estimator(lambda: self.estimator.from_loss(loss, params, logits=logits))
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g / self.accumulate if self.accumulate > 1 else g
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return loss, estimates

    def _optimizer_step(self, opt, x, y, loss, preds: int, estimates=None) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
        if not torch.isfinite(grad_norm):
            self._nonfinite(opt, loss)
            return
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        step = self.global_step
        if estimates is not None:
            self._apply_estimates(opt, estimates)
        elif self.estimator is not None and self._refresh_due(step):
            self._refresh_hessian(opt, x, y)
        collect = (step + 1) % self.log_stats_every == 0 and hasattr(opt.optimizer, "stats")
        kwargs = {"collect_stats": True} if collect else {}
        if self.estimator_name == "gnb":
            kwargs["bs"] = preds
        # Lightning runs training_step under autocast for *-mixed precision; the optimizer must not:
        # its matmuls (SOAP's projections) would come out in bf16/fp16 and mix with fp32 state.
        with _autocast_off(self.device):
            opt.step(**kwargs)
        opt.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        # Compute time per optimizer step (forward/backward of its micro-batches, refresh, step), the
        # mean over the last `every_k` steps (one refresh period); data loading and validation excluded.
        self._step_times.append((time.perf_counter() - self._window_start) * 1e3)
        self.log("time/step_ms", sum(self._step_times) / len(self._step_times), on_step=True, on_epoch=False)

        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/grad_norm", grad_norm, on_step=True, on_epoch=False)
        self.log("train/lr", opt.param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self.estimator_name == "gnb":
            self.log("train/sophia_bs", float(preds), on_step=True, on_epoch=False)
        if collect:
            for key, value in opt.optimizer.stats().items():
                self.log(f"optim/{key}", value.float(), on_step=True, on_epoch=False)
            self.log("optim/hessian_refreshes", float(self.hessian_refreshes), on_step=True, on_epoch=False)
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), on_step=True, on_epoch=False)

    def _nonfinite(self, opt, loss: torch.Tensor) -> None:
        msg = f"non-finite gradient at optimizer step {self.global_step} (loss {loss.item():.6g})"
        if self.nonfinite == "raise":
            raise FloatingPointError(msg + "; set module.nonfinite=skip to drop such steps instead")
        self.nonfinite_skipped += 1
        warnings.warn(
            msg + f"; step skipped ({self.nonfinite_skipped} so far), optimizer state untouched",
            RuntimeWarning,
            stacklevel=2,
        )
        opt.zero_grad(set_to_none=True)

    def _refresh_due(self, step: int) -> bool:
        p = self.hessian_cfg["refresh_prob"]
        if p is None:
            return step % self.hessian_cfg["every_k"] == 0
        draw = torch.rand((), generator=self.refresh_rng).item()  # drawn every step: resumable stream
        return step == 0 or draw < p

    @property
    def refresh_rng(self) -> torch.Generator:
        """Generator of the random refresh schedule (seeded from ``hessian.seed``)."""
        if self._refresh_rng is None:
            self._refresh_rng = torch.Generator().manual_seed(int(self.hessian_cfg["seed"]) + 1)
        return self._refresh_rng

    def _refresh_hessian(self, opt, x: torch.Tensor, y: torch.Tensor) -> None:
        params = opt.optimizer.hessian_params()
        estimates = self._run_estimator(
            lambda: self.estimator(lambda: self.net(x), lambda out: self.loss_fn(out, y), params)
        )
        self._apply_estimates(opt, estimates)

    def _run_estimator(self, fn):
        try:
            return fn()
        except RuntimeError as err:
            if "derivative" in str(err) or "double backward" in str(err) or "not implemented" in str(err):
                raise RuntimeError(
                    f"The {self.estimator_name} Hessian estimate failed for this model ({err}). "
                    f"Optimizer {self.optimizer_name!r} needs a model that supports double backward; "
                    "use optimizer=adamw or soap with it."
                ) from err
            raise

    def _apply_estimates(self, opt, estimates) -> None:
        estimates = self._all_reduce_mean(estimates)
        if opt.optimizer.update_hessian(estimates):
            self.hessian_refreshes += 1
        else:
            self.hessian_skipped += 1

    def _all_reduce_mean(self, tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Average estimates across ranks (they bypass DDP's gradient hooks)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1:
            return tensors
        live = [i for i, t in enumerate(tensors) if t is not None]
        flat = torch.cat([tensors[i].reshape(-1).float() for i in live])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        out = list(tensors)
        offset = 0
        for i in live:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i]).to(tensors[i].dtype)
            offset += n
        return out

    def on_train_epoch_end(self) -> None:
        if self._micro:
            warnings.warn(
                f"{self._micro} micro-batch(es) at the end of the epoch did not fill an accumulation "
                f"window of {self.accumulate}; their gradients were dropped.",
                RuntimeWarning,
                stacklevel=2,
            )
            self.optimizers().zero_grad(set_to_none=True)
            self._micro = self._micro_preds = 0

    # ------------------------------------------------------------ evaluation
    def _eval_step(self, batch, stage: str):
        x, y = batch
        logits = self.net(x)
        loss = self.loss_fn(logits, y)
        getattr(self, f"{stage}_loss").update(loss)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_step=False, on_epoch=True, prog_bar=True)
        if self.task == "classification":
            acc = getattr(self, f"{stage}_acc")
            acc.update(logits, y)
            self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        loss = self.val_loss.compute()
        self.val_loss_best.update(loss)
        self.log("val/loss_best", self.val_loss_best.compute(), prog_bar=False)
        if self.task == "lm":
            self.log("val/ppl", torch.exp(loss))
        else:
            self.val_acc_best.update(self.val_acc.compute())
            self.log("val/acc_best", self.val_acc_best.compute())

    def on_test_epoch_end(self) -> None:
        if self.task == "lm":
            self.log("test/ppl", torch.exp(self.test_loss.compute()))

    # ----------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["flatsophia"] = {
            "optimizer_name": self.optimizer_name,
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "refresh_rng": self.refresh_rng.get_state(),
            "micro": self._micro,
            "nonfinite_skipped": self.nonfinite_skipped,
            "hessian_refreshes": self.hessian_refreshes,
            "hessian_skipped": self.hessian_skipped,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("flatsophia")
        if extra is None:
            return
        if extra["optimizer_name"] != self.optimizer_name:
            raise ValueError(
                f"This checkpoint was written with optimizer {extra['optimizer_name']!r}, but this run uses "
                f"{self.optimizer_name!r}; resume with optimizer={extra['optimizer_name']} or start fresh."
            )
        if extra["estimator"] is not None:
            self.estimator = build_estimator(extra["estimator"]["name"], seed=extra["estimator"]["seed"])
            if self.estimator.name == "hutchinson":
                self.estimator.distribution = self.hessian_cfg["distribution"]
                self.estimator.n_probes = int(self.hessian_cfg["n_probes"])
            self.estimator.load_state_dict(extra["estimator"])
        self.refresh_rng.set_state(extra["refresh_rng"])
        self.nonfinite_skipped = extra["nonfinite_skipped"]
        self.hessian_refreshes = extra["hessian_refreshes"]
        self.hessian_skipped = extra["hessian_skipped"]
        if extra["micro"]:
            log.warning("checkpoint was taken mid accumulation window; the partial window is dropped")


def _factory_name(factory) -> str:
    target = factory.func if isinstance(factory, functools.partial) else factory
    spec = spec_for(target) if isinstance(target, type) else None
    return spec.name if spec else getattr(target, "__name__", type(target).__name__)
