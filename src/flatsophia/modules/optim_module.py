"""LightningModule that trains any network with any optimizer of the registry, second-order included.

Manual optimization, so the module owns the whole optimizer step: gradient accumulation over
``accumulate`` micro-batches, clipping, the non-finite policy, the LR scheduler and logging. The
Hessian refresh (which estimator, when, averaging across ranks, its checkpointed state) is a
:class:`~flatsophia.hessian.refresh.HessianRefresher`, which the module calls.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
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

from flatsophia.hessian import HessianRefresher
from flatsophia.hessian.precision import choose_hvp, record_precision
from flatsophia.optim import SOAP
from flatsophia.optim.factory import param_groups, spec_for
from flatsophia.optim.schedules import warmup_decay
from flatsophia.sharding import any_dtensor, fully_shard_blocks, global_norm
from flatsophia.validation import (
    HESSIAN_DEFAULTS,
    SCHEDULER_DEFAULTS,
    SHARDED_AUTOGRAD,
    TASKS,
    check_choice,
    check_estimator_fits,
    check_hessian_block,
    check_int,
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


#: What Lightning's ``trainer.precision`` rounds the training pass to (TF32 and FSDP2's policy are
#: read from the model, see :func:`~flatsophia.hessian.precision.record_precision`).
LIGHTNING_PRECISION = {
    "bf16-mixed": {"autocast": torch.bfloat16},
    "16-mixed": {"autocast": torch.float16},
    "bf16-true": {"param_dtype": torch.bfloat16},
    "16-true": {"param_dtype": torch.float16},
}


def resolve_hvp(hvp: str, estimator: str, precision: str, net: nn.Module, sharded: bool = False) -> str:
    """``hessian.hvp`` with ``auto`` resolved by the library's rule
    (:func:`~flatsophia.hessian.precision.choose_hvp`, the refresher's ``hvp="auto"``) for training in
    ``precision`` (Lightning's ``trainer.precision``) plus what ``net`` and the global flags show (TF32
    on CUDA, an FSDP2 ``param_dtype``): the finite difference in full precision, the double backward in
    reduced precision, and under FSDP2 the finite difference (its gradients then taken in float32).
    Only the Hutchinson estimator takes an ``hvp``; for the others ``auto`` is ``autograd``, which they
    ignore."""
    if hvp != "auto":
        return hvp
    if estimator != "hutchinson":
        return "autograd"
    recorded = dataclasses.replace(record_precision(net.parameters(), net), **LIGHTNING_PRECISION.get(precision, {}))
    try:
        choice = choose_hvp(recorded, sharded)
    except ValueError as err:  # FSDP2 with half-precision parameters, said in config keys
        raise ValueError(
            f"{err} In the config: trainer.precision=bf16-mixed (autocast over float32 parameters), "
            "or optimizer=sophia_g."
        ) from err
    log.info("hessian.hvp=auto: %s (%s%s)", choice, recorded.describe(), ", FSDP2" if sharded else "")
    return choice


def refresher_options(hessian: dict, estimator: str, optimizer_name: str, sharded: bool = False) -> dict:
    """The ``hessian`` block as :class:`~flatsophia.hessian.refresh.HessianRefresher` arguments, after
    the checks and warnings the refresher would give in library arguments, given here in config keys
    (``hessian=...``, ``hessian.hvp=...``): a mismatched estimator, an ignored schedule or ``hvp``
    (then left at its default), ``hessian.hvp=autograd`` under FSDP2."""
    check_estimator_fits(hessian["estimator"], estimator, optimizer_name)
    options = dict(hessian)
    if estimator == "none" and hessian["estimator"] == "auto" and (hessian["every_k"] != 10 or hessian["refresh_prob"]):
        warnings.warn(
            f"hessian.every_k/refresh_prob are set but optimizer={optimizer_name} uses no Hessian estimate; "
            "they are ignored.",
            UserWarning,
            stacklevel=3,
        )
        options.update(every_k=10, refresh_prob=None)
    if estimator != "hutchinson" and hessian["hvp"] not in ("auto", "autograd"):
        warnings.warn(
            f"hessian.hvp={hessian['hvp']} only applies to the Hutchinson estimator; optimizer={optimizer_name} "
            f"uses {estimator!r}, so it is ignored.",
            UserWarning,
            stacklevel=3,
        )
        options["hvp"] = "auto"
    if sharded and estimator == "hutchinson" and hessian["hvp"] == "autograd":
        raise ValueError(SHARDED_AUTOGRAD)
    return options


@contextlib.contextmanager
def _in_config_keys():
    """A refresh that fails for want of a double backward, with the way out in config keys."""
    try:
        yield
    except RuntimeError as err:
        if "supports double backward" not in str(err):
            raise
        raise RuntimeError(
            f"{err} In the config: hessian.hvp=finite_difference, or optimizer=adamw or optimizer=soap."
        ) from err


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
            n_probes, seed, hvp: auto|autograd|finite_difference, batch_fraction}``; ``auto`` picks the
            estimator the optimizer consumes. ``batch_fraction`` f < 1: the refresh estimates on the
            first ``ceil(f * B)`` examples of the last micro-batch of the step (the one it always
            uses); with ``hvp=finite_difference`` that micro-batch's training pass then runs as two
            chunks, the subset first (:meth:`_split_backward`), unless the network has BatchNorm in
            training mode or is sharded (FSDP2): then the refresh takes the subset's gradient itself.
        task: ``"classification"`` or ``"lm"`` (cross-entropy over the last dim either way).
        num_classes: classes, or vocabulary size for ``lm``.
        grad_clip: max global gradient norm (``None``/0 disables clipping).
        accumulate: micro-batches per optimizer step.
        nonfinite: ``"skip"`` (drop a step whose gradient is NaN/inf, count it and warn) or
            ``"raise"`` (stop with the step and the loss).
        weight_decay_rule: ``"matrices"``, ``"all"`` or ``"none"`` (see ``param_groups``).
        optimizer_name: registry name, used in messages and checkpoints.
        log_stats_every: collect and log optimizer diagnostics every this many optimizer steps.

    Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp`` / ``fsdp_sim``) :meth:`configure_model`
    shards the network with FSDP2 (data parallel only); the optimizer then steps on the shards and the
    refresher takes its estimates from backward passes through FSDP (no extra reduce): Sophia-G,
    Sophia-H and FlatSophia with ``hessian.hvp=finite_difference``, AdamW; not SOAP.
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
        check_int("num_classes", num_classes, 2)
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

        # Training-loop state that checkpoints carry (see on_save_checkpoint). The refresher is built
        # with the optimizer (configure_optimizers, which runs after on_load_checkpoint on resume: a
        # restored state waits in _refresher_state), in the worker process under ddp_spawn.
        self.refresher: HessianRefresher | None = None
        self._refresher_state: dict | None = None
        self._micro = 0
        self._micro_preds = 0
        self._window_start = 0.0
        # Compute times of the last `every_k` optimizer steps: `time/step_ms` is their mean, so it
        # includes the periodic Hessian refresh (a per-step value logged every 10 steps never would).
        self._step_times: collections.deque[float] = collections.deque(maxlen=_time_window(self.hessian_cfg))
        self.nonfinite_skipped = 0

    @property
    def estimator_name(self) -> str:
        """The Hessian estimator the optimizer consumes (``"none"`` before ``configure_optimizers``)."""
        return self.refresher.estimator_name if self.refresher is not None else "none"

    @property
    def hessian_refreshes(self) -> int:
        return self.refresher.refreshes if self.refresher is not None else 0

    # ----------------------------------------------------------------- model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``: shard the network with FSDP2 over the
        data-parallel mesh (:func:`~flatsophia.sharding.fully_shard_blocks`). A no-op under other
        strategies, and when the network is sharded already (Lightning calls this for fit and test)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        if any_dtensor(self.net.parameters()):
            return
        mesh = self.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"OptimLitModule shards data-parallel only (FSDP2); got tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()}. Set trainer.strategy.tensor_parallel_size=1 and "
                "data_parallel_size to the number of processes (devices x num_nodes)."
            )
        fully_shard_blocks(self.net, mesh["data_parallel"])

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        groups = param_groups(self.net, decay=self.weight_decay_rule)
        opt = self.optimizer_factory(groups)
        world = self.trainer.world_size if self._trainer is not None else 1
        sharded = any_dtensor(self.net.parameters())  # FSDP2: estimates are averaged by its reduce-scatter
        if sharded and isinstance(opt, SOAP):
            raise ValueError(
                "optimizer=soap does not run on parameters sharded by FSDP2 (its Kronecker factors and "
                "eigenbases need whole matrices); use trainer=ddp, or another optimizer"
            )
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        estimator = getattr(opt, "hessian_estimator", "none")
        options = refresher_options(self.hessian_cfg, estimator, self.optimizer_name, sharded)
        hvp = resolve_hvp(options["hvp"], estimator, precision, self.net, sharded)
        self.refresher = HessianRefresher(
            opt,
            **{**options, "hvp": hvp},
            model=self.net,
            reduce=self._reduce_mean if world > 1 and not sharded else None,
            optimizer_name=self.optimizer_name,
        )
        if self._refresher_state is not None:
            self.refresher.load_state_dict(self._refresher_state)
            self._refresher_state = None
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

    def _reduce_mean(self, flat: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(flat, reduce_op="mean")

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
        share = self._split_share(y) if last and self.refresher.splits(self.global_step) else None
        if last and self._can_share_forward():
            with _in_config_keys():
                loss, estimates = self.refresher.forward_backward(
                    lambda: self.net(x), lambda out: self.loss_fn(out, y), loss_divisor=self.accumulate
                )
        elif share is not None:
            loss = self._split_backward(opt, x, y, share)
        else:
            # hvp=finite_difference keeps the last micro-batch's own gradient and RNG state for the refresh
            refresh_pass = self.refresher.training_pass(self.global_step, self.accumulate) if last else None
            with refresh_pass or contextlib.nullcontext():
                loss = self.loss_fn(self.net(x), y)
                with opt.toggle_model(sync_grad=last):
                    self.manual_backward(loss / self.accumulate)
        self._loss_sum = loss.detach() if self._micro == 1 else self._loss_sum + loss.detach()
        if not last:
            return loss.detach()
        preds = self._micro_preds * self.trainer.world_size
        self._micro = self._micro_preds = 0
        xs, ys = self.refresher.subset((x, y))  # what the refresh estimates on (hessian.batch_fraction)
        # the share scales a Gauss-Newton-Bartlett estimate: counted (a device sync) on due steps only
        refreshing = self.refresher.batch_fraction < 1 and self.refresher.due(self.global_step, peek=True)
        share = self._subset_share(y) if refreshing else None
        self._optimizer_step(opt, xs, ys, self._loss_sum / self.accumulate, preds, estimates, share)
        return loss.detach()

    def _subset_share(self, y: torch.Tensor) -> float:
        """The refresh subset's share of the batch's loss: the targets :meth:`loss_fn` counts (those
        not equal to its ``ignore_index``, -100) in the first ``ceil(f * B)`` examples over those in
        the batch (1 when the subset is the whole batch or counts no target, whose estimate is then
        NaN and skipped). A subclass whose loss is not a mean over targets overrides this."""
        n = self.refresher.subset_size(len(y))
        if n == len(y):
            return 1.0
        counted = (y.reshape(len(y), -1) != -100).sum(dim=1)
        head, total = int(counted[:n].sum()), int(counted.sum())
        return head / total if head else 1.0

    def _split_share(self, y: torch.Tensor) -> float | None:
        """:meth:`_subset_share` for a training pass in two chunks; ``None`` (no split) when either
        chunk would count no target (its mean loss would be NaN) or the subset is the whole batch."""
        share = self._subset_share(y)
        return share if share < 1 else None

    def _split_backward(self, opt, x: torch.Tensor, y: torch.Tensor, share: float) -> torch.Tensor:
        """The last micro-batch's training pass in two chunks (``refresher.splits``): the refresh
        subset, whose gradient the finite difference reuses, then the rest of the micro-batch,
        each back-propagating its share of the mean loss, so ``.grad`` gets the whole micro-batch's
        gradient (to rounding). Only the second backward synchronizes gradients across DDP ranks.
        Returns the micro-batch's (undivided) loss."""
        (xs, ys), (xr, yr) = self.refresher.split((x, y))
        divisor = self.accumulate / share  # the subset's loss / divisor: its part of this step's loss
        with self.refresher.training_pass(self.global_step, divisor, subset=True):
            head = self.loss_fn(self.net(xs), ys)
            with opt.toggle_model(sync_grad=False):
                self.manual_backward(head / divisor)
        tail = self.loss_fn(self.net(xr), yr)
        with opt.toggle_model(sync_grad=True):
            self.manual_backward(tail * ((1 - share) / self.accumulate))
        return head.detach() * share + tail.detach() * (1 - share)

    def _can_share_forward(self) -> bool:
        """Whether this step's refresh shares the training forward (the refresher's conditions, and
        no fp16 loss scaling: the shared gradient bypasses Lightning's precision plugin)."""
        return self.refresher.shares_forward(self.global_step) and str(self.trainer.precision) not in (
            "16-mixed",
            "16",
            "16-true",
        )

    def _optimizer_step(self, opt, x, y, loss, preds: int, estimates=None, share: float | None = None) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = global_norm([p.grad for p in params])  # FSDP2: each rank's shards, one all-reduce
        if not torch.isfinite(grad_norm):
            self._nonfinite(opt, loss)
            return
        if self.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        step = self.global_step
        with _in_config_keys():
            self.refresher.maybe_refresh(
                step, lambda: self.net(x), lambda out: self.loss_fn(out, y), estimates, share=share
            )
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
            self.log("optim/hessian_refreshes", float(self.refresher.refreshes), on_step=True, on_epoch=False)
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
            "micro": self._micro,
            "nonfinite_skipped": self.nonfinite_skipped,
            "refresher": self.refresher.state_dict() if self.refresher is not None else None,
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
        state = extra.get("refresher")
        if "refresh_rng" in extra:  # written before the refresher existed: the same state, flat
            state = {
                "estimator": extra["estimator"],
                "schedule_rng": extra["refresh_rng"],
                "refreshes": extra["hessian_refreshes"],
                "skipped": extra["hessian_skipped"],
            }
        if state is not None:
            if self.refresher is not None:
                self.refresher.load_state_dict(state)
            else:
                self._refresher_state = state
        self.nonfinite_skipped = extra["nonfinite_skipped"]
        if extra["micro"]:
            log.warning("checkpoint was taken mid accumulation window; the partial window is dropped")


def _factory_name(factory) -> str:
    target = factory.func if isinstance(factory, functools.partial) else factory
    spec = spec_for(target) if isinstance(target, type) else None
    return spec.name if spec else getattr(target, "__name__", type(target).__name__)
