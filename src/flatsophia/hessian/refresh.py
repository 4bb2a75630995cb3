"""Keeping an optimizer's diagonal-Hessian estimate fresh during training, in any training loop.

:class:`HessianRefresher` holds what a loop needs around the estimators: which estimator the
optimizer consumes (``"auto"``), when to refresh (every ``every_k`` optimizer steps, or at random
with probability ``refresh_prob`` from its own seeded generator), the estimate itself (from a fresh
forward, or sharing the training forward), averaging it across data-parallel ranks (a ``reduce``
callable), counting refreshes and rejected (non-finite) estimates, and a ``state_dict`` of plain
types for checkpoints. Torch only: in a plain loop :meth:`~HessianRefresher.backward` replaces
``loss.backward()``::

    import torch.nn.functional as F
    from flatsophia.hessian import HessianRefresher
    from flatsophia.optim import SophiaH

    opt = SophiaH(model.parameters(), lr=1e-3)
    refresher = HessianRefresher(opt, model=model)  # model may be DDP-wrapped or fully_shard-ed
    for x, y in loader:
        loss = refresher.backward(x, y, F.cross_entropy)  # and, every 10th step, the refresh
        opt.step()
        opt.zero_grad()

docs/library.md covers accumulation, mixed precision (autocast, ``scaler=`` with a
``torch.amp.GradScaler``), DDP, FSDP2 and checkpoints. The lower-level methods that ``backward``
combines, for loops it does not fit (another call signature, the framework runs the backward, as the
template's Lightning module does): :meth:`~HessianRefresher.shares_forward` and
:meth:`~HessianRefresher.forward_backward` (one forward for the gradient and the estimate),
:meth:`~HessianRefresher.training_pass` (records the pass's gradient, RNG state and precision, so a
finite difference reuses them) and :meth:`~HessianRefresher.maybe_refresh` (the estimate on a due
step, handed to ``optimizer.update_hessian``); docs/library.md shows the loop they make.

With ``hvp="finite_difference"`` (Hutchinson's ``H v`` from two gradients, no double backward)
``shares_forward`` is ``False``, and ``training_pass`` lets the refresh reuse the pass's gradient and
replay its dropout masks (one extra forward+backward per refresh). The default ``hvp="auto"``
follows the precision ``training_pass`` records (put ``torch.autocast`` around the forward, or
around ``backward``): the finite difference after a float32 pass, the double backward after a
bf16/fp16-autocast or TF32 one (see :func:`~flatsophia.hessian.precision.choose_hvp`).

Under ``torch.distributed`` with DDP the estimates taken with ``torch.autograd.grad`` bypass DDP's
gradient hooks, so each rank's estimate is averaged by ``reduce`` (``distributed_mean`` by default
when ``model`` is the ``DistributedDataParallel`` wrapper), the refresh forwards use the unwrapped
module, and ``shares_forward`` is always ``False`` (the training gradient must go through DDP).

Sharded data parallelism (FSDP2, ``fully_shard``: the optimizer's parameters are DTensors): the
``fully_shard``-ed model and ``reduce=None``. Every estimate then comes from ordinary ``backward()``
passes, which FSDP's reduce-scatter averages across ranks (no further reduce): Gauss-Newton-Bartlett's
sampled-label gradient, and Hutchinson with ``hvp="finite_difference"`` (``hvp="autograd"`` is
refused); the training gradient in ``.grad`` is set aside and put back, and :meth:`training_pass`
records it from ``.grad``.

Part of the batch (``batch_fraction=f < 1``): the refresh estimates on the first ``ceil(f * B)``
examples, which :meth:`~HessianRefresher.subset` takes from a batch of any nesting; the estimate
feeds an EMA, so the smaller sample adds noise, not bias. ``shares_forward`` is then ``False``
(sharing would cost a full-batch extra backward): Gauss-Newton-Bartlett and ``hvp="autograd"``
take a fresh forward on the subset. ``hvp="finite_difference"`` needs the subset's own gradient:
where :meth:`~HessianRefresher.splits` says so, run the training pass in two chunks, the subset
first, each back-propagating its share of the loss (``share = n / B`` for a mean over examples)::

        if refresher.splits(step):
            (sx, sy), (rx, ry) = refresher.split((x, y))
            divisor = len(y) / len(sy)  # the subset's loss / divisor is its share of the batch's mean
            with refresher.training_pass(step, loss_divisor=divisor, subset=True):
                (F.cross_entropy(model(sx), sy) / divisor).backward()  # under DDP: no_sync() here
            (F.cross_entropy(model(rx), ry) * (len(ry) / len(y))).backward()
        else:
            ...  # the whole pass, as above
        sx, sy = refresher.subset((x, y))
        share = len(sy) / len(y)  # Gauss-Newton-Bartlett scales its estimate by it (see maybe_refresh)
        refresher.maybe_refresh(step, lambda: model(sx), lambda out: F.cross_entropy(out, sy), share=share)

A whole-batch pass at ``f < 1`` records no gradient, and the refresh takes both of the subset's
gradients itself (cost ``2f`` forward+backwards instead of ``f``): :meth:`splits` chooses that for a
model with BatchNorm (or other running statistics) in training mode, whose output two chunks would
change, and under FSDP2.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from flatsophia.checks import check_int, check_probability
from flatsophia.sharding import any_dtensor

from .base import HessianEstimator, build_estimator, capture_rng_state, cuda_devices, math_attention, replayed_rng
from .hutchinson import HVP_MODES, SHARDED_AUTOGRAD
from .precision import TrainingPrecision, choose_hvp, full_precision, record_precision
from .subset import batch_size, batch_statistics_layers, split_batch, subset_size

__all__ = ["HessianRefresher", "check_estimator_fits", "distributed_mean"]

Estimates = list[torch.Tensor | None]


def check_estimator_fits(asked: str, needed: str, optimizer_name: str) -> None:
    """Raise ``ValueError`` unless the ``estimator`` asked for (``"auto"`` fits all) is the one the
    optimizer (``optimizer_name``: its class name) consumes.

    The message lists the valid combinations of the library's optimizer classes. (The template's
    :func:`flatsophia.validation.check_estimator_fits` says the same in config keys.)
    """
    if asked not in ("auto", needed):
        raise ValueError(
            f"estimator={asked!r} does not fit {optimizer_name}, which consumes {needed!r}. "
            f"Valid combinations: {_class_combinations()} (estimator='auto' picks the right one)."
        )


def _class_combinations() -> str:
    """Which optimizer classes consume which estimator, e.g. ``"SophiaG + 'gnb'; SophiaH, FlatSophia +
    'hutchinson'; AdamW, SOAP + 'none'"``."""
    from flatsophia.optim.factory import OPTIMIZERS

    parts = []
    for est in ("gnb", "hutchinson", "none"):
        names = [spec.cls.__name__ for spec in OPTIMIZERS.values() if spec.hessian == est]
        if names:
            parts.append(f"{', '.join(dict.fromkeys(names))} + {est!r}")
    return "; ".join(parts)


def distributed_mean(flat: torch.Tensor) -> torch.Tensor:
    """Mean of ``flat`` over the ranks of the default ``torch.distributed`` process group (a ``reduce``)."""
    torch.distributed.all_reduce(flat)
    return flat.div_(torch.distributed.get_world_size())


def _optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    from flatsophia.optim.factory import spec_for

    spec = spec_for(optimizer)
    return spec.name if spec else type(optimizer).__name__


class HessianRefresher:
    """Refreshes ``optimizer``'s Hessian estimate on schedule; :meth:`backward` is the loop's one call
    (see the module docstring and docs/library.md).

    Args:
        optimizer: the optimizer (its ``hessian_estimator`` attribute names the estimator it
            consumes: ``"none"``, ``"gnb"`` or ``"hutchinson"``; ``hessian_params()`` and
            ``update_hessian(estimates) -> bool`` are called).
        estimator: ``"auto"`` (the one the optimizer consumes), that estimator's name (anything else
            raises ``ValueError`` listing the valid combinations), or a
            :class:`~flatsophia.hessian.base.HessianEstimator` instance of the right kind.
        model: the network, whose buffers (BatchNorm running statistics and batch counter) every
            refresh's extra forward leaves as they were: pass it whenever the network has buffers
            (needed for ``hvp="finite_difference"`` and :meth:`backward`). A shared forward
            (:meth:`forward_backward`) is the training forward itself, which updates them once, as
            training without a refresh does. A ``DistributedDataParallel`` wrapper is what
            :meth:`backward` trains through; the refresh uses its ``.module`` (the ``model``
            attribute), and ``reduce`` defaults to :func:`distributed_mean`.
        every_k: refresh at every ``every_k``-th optimizer step (steps 0, k, 2k, ...).
        refresh_prob: instead, refresh each step with this probability (always at step 0), drawn
            from the refresher's generator (seeded with ``seed + 1``, saved in :meth:`state_dict`).
        distribution, n_probes: Hutchinson's probe distribution and probes per estimate.
        seed: seed of the estimator's generator.
        hvp: Hutchinson's Hessian-vector product: ``"auto"`` (default), ``"autograd"`` (double
            backward) or ``"finite_difference"`` (two gradients, see :meth:`Hutchinson.finite_difference
            <flatsophia.hessian.hutchinson.Hutchinson.finite_difference>` and :meth:`training_pass`);
            ignored (with a warning, except ``"auto"``) by the other estimators. ``"auto"`` follows
            the precision :meth:`training_pass` records (:func:`~flatsophia.hessian.precision.choose_hvp`):
            the finite difference after a full-precision pass, the double backward after a reduced-precision
            one (autocast, TF32, half parameters), and under FSDP2 always the finite difference, then with
            both gradients in float32. It starts as the finite difference when ``model`` is given and the
            precision in effect at construction is full, else as the double backward.
            A finite difference after a reduced-precision pass never reuses that pass's gradient (its
            relative error would be 0.15-7, docs/performance.md): the refresh takes both gradients itself
            in float32 with autocast and TF32 off (one more forward+backward), with one warning when
            ``"finite_difference"`` was asked for explicitly.
        reduce: ``flat_tensor -> mean over ranks`` (e.g. :func:`distributed_mean`, or Lightning's
            ``strategy.reduce``); ``None`` on one process, and with sharded (FSDP2) parameters,
            whose estimates FSDP averages already (anything else raises ``ValueError``).
        optimizer_name: name used in messages (default: the registry name of the optimizer's class).
        scaler: the loop's ``torch.amp.GradScaler`` (float16 mixed precision), or ``None``. The
            refresh then differentiates losses times ``scaler.get_scale()`` (float16 gradients
            would underflow otherwise) and divides the estimate by it: :meth:`forward_backward`
            adds the scaled gradient to ``.grad``, as ``scaler.scale(loss).backward()`` does, and
            :meth:`training_pass` takes the recorded gradient as the scaled one. An estimate that
            overflows is skipped (``skipped``), as the scaler skips such a step.
        batch_fraction: estimate on the first ``ceil(batch_fraction * B)`` examples of the batch
            (a number in (0, 1], default 1: the whole batch). The loop passes the refresh closures
            over :meth:`subset` of its batch; see the module docstring for the training pass.

    Attributes:
        estimator: the :class:`~flatsophia.hessian.base.HessianEstimator`, or ``None`` for a
            first-order optimizer (then every method is a no-op).
        estimator_name: ``"none"``, ``"gnb"`` or ``"hutchinson"``.
        sharded: whether the optimizer's parameters are DTensors sharded across ranks (FSDP2).
        refreshes: estimates the optimizer accepted; ``skipped``: estimates it rejected (NaN/inf).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        estimator: str | HessianEstimator = "auto",
        *,
        model: nn.Module | None = None,
        every_k: int = 10,
        refresh_prob: float | None = None,
        distribution: str = "gaussian",
        n_probes: int = 1,
        seed: int = 0,
        hvp: str = "auto",
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        optimizer_name: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        batch_fraction: float = 1,
    ):
        check_int("every_k", every_k, 1)
        check_probability("batch_fraction", batch_fraction)
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise ValueError(f"Invalid scaler: {scaler!r} (expected a torch.amp.GradScaler or None)")
        check_probability("refresh_prob", refresh_prob, allow_none=True)
        self.optimizer = optimizer
        self.model = model
        self.every_k = every_k
        self.refresh_prob = refresh_prob
        self.seed = seed
        self.reduce = reduce
        self.scaler = scaler
        self.batch_fraction = batch_fraction
        self.optimizer_name = optimizer_name or _optimizer_name(optimizer)
        self.refreshes = 0
        self.skipped = 0
        self._rng: torch.Generator | None = None  # created on first use (see `rng`)
        self._pass: _TrainingPass | None = None  # recorded by training_pass for a finite difference
        self._warned_precision = False
        self._warned_split = False
        if hvp != "auto" and hvp not in HVP_MODES:
            raise ValueError(f"Invalid hvp: {hvp!r} (expected auto or one of {', '.join(HVP_MODES)})")

        needed = getattr(optimizer, "hessian_estimator", "none")
        asked = estimator.name if isinstance(estimator, HessianEstimator) else estimator
        if asked == "auto" and needed == "none" and (every_k != 10 or refresh_prob):
            warnings.warn(
                f"every_k/refresh_prob are set but {type(optimizer).__name__} uses no Hessian estimate; "
                "they are ignored.",
                UserWarning,
                stacklevel=2,
            )
        check_estimator_fits(asked, needed, type(optimizer).__name__)
        if hvp not in ("auto", "autograd") and needed != "hutchinson":
            warnings.warn(
                f"hvp={hvp!r} only applies to the Hutchinson estimator; {type(optimizer).__name__} "
                f"uses {needed!r}, so it is ignored.",
                UserWarning,
                stacklevel=2,
            )
        self.estimator_name = needed
        params = optimizer.hessian_params() if needed != "none" else []
        self.sharded = any_dtensor(params)
        # hvp="auto" (Hutchinson built here): re-chosen from the precision each training_pass records
        self.hvp_auto = hvp == "auto" and needed == "hutchinson" and not isinstance(estimator, HessianEstimator)
        if self.hvp_auto:
            hvp = choose_hvp(record_precision(params, model), self.sharded) if model or self.sharded else "autograd"
        if isinstance(estimator, HessianEstimator):
            self.estimator: HessianEstimator | None = estimator
        else:
            kwargs = {"seed": seed}
            if needed == "hutchinson":
                kwargs.update(distribution=distribution, n_probes=n_probes, hvp=hvp)
            self.estimator = build_estimator(needed, **kwargs)
        if self.finite_difference and model is None:
            raise ValueError(
                "hvp=finite_difference needs model= (the network: its buffers, e.g. BatchNorm "
                "statistics, are restored after the perturbed pass)"
            )
        if self.sharded:
            if self.estimator_name == "hutchinson" and not self.finite_difference:
                raise ValueError(SHARDED_AUTOGRAD)
            if self.estimator_name == "hutchinson":
                choose_hvp(record_precision(params, model), sharded=True)  # half-precision FSDP2: refused
            if reduce is not None:
                raise ValueError(
                    "The optimizer's parameters are sharded (FSDP2 DTensors): its Hessian estimates come from "
                    "backward passes that FSDP's reduce-scatter averages across ranks already, and each rank "
                    "holds other coordinates, so nothing may be averaged again: pass reduce=None"
                )
        self._init_loop(model)

    @property
    def finite_difference(self) -> bool:
        """Whether the estimate takes ``H v`` from two gradients (Hutchinson, ``hvp="finite_difference"``)."""
        return getattr(self.estimator, "hvp", None) == "finite_difference"

    # -------------------------------------------------------------- schedule
    @property
    def rng(self) -> torch.Generator:
        """Generator of the random schedule (seeded with ``seed + 1``)."""
        if self._rng is None:
            self._rng = torch.Generator().manual_seed(int(self.seed) + 1)
        return self._rng

    def due(self, step: int, *, peek: bool = False) -> bool:
        """Whether optimizer step ``step`` refreshes. The random schedule draws on every call:
        call it once per optimizer step that is taken (``maybe_refresh`` does), so a resumed run
        draws the same stream. ``peek=True`` gives the same answer from a copy of the generator,
        leaving the stream as it is."""
        if self.refresh_prob is None:
            return step % self.every_k == 0
        rng = torch.Generator().set_state(self.rng.get_state()) if peek else self.rng
        draw = torch.rand((), generator=rng).item()
        return step == 0 or draw < self.refresh_prob

    def shares_forward(self, step: int) -> bool:
        """Whether step ``step``'s refresh can share the training forward (:meth:`forward_backward`).

        Both estimators can: Hutchinson differentiates the training gradient once more, and
        Gauss-Newton-Bartlett samples its labels from the training logits and back-propagates the
        sampled-label loss through the same graph. Only on one process (``reduce is None``: under
        DDP the training gradient must go through DDP's hooks), with the fixed every-k schedule
        (the random one draws when the step is taken, after the loop's checks), and on the whole
        batch (``batch_fraction=1``: on a subset a fresh forward costs less than a full-batch
        extra backward).
        """
        return (
            self.batch_fraction == 1
            and self.estimator_name in ("hutchinson", "gnb")
            and hasattr(self.estimator, "from_loss")
            and not self.finite_difference
            and self.reduce is None
            and not self.sharded
            and self.refresh_prob is None
            and self.due(step)
        )

    # ------------------------------------------------------------ the subset
    def subset_size(self, n: int) -> int:
        """Examples the refresh estimates on out of a batch of ``n``: ``ceil(batch_fraction * n)``
        (``batch_fraction * n`` rounded to 9 decimals first, so 0.1 of 30 is 3), at least 1."""
        check_int("batch size", n, 1)
        return subset_size(self.batch_fraction, n)

    def split(self, batch):
        """``(subset, rest)``: the first :meth:`subset_size` rows of every tensor of ``batch`` (a
        tensor, or tuples, lists, dicts of them, nested) along dim 0, and the other rows (views;
        non-tensor leaves and 0-d tensors go to both). ``ValueError`` when the tensors do not share
        one leading size."""
        return split_batch(batch, self.subset_size(batch_size(batch)))

    def subset(self, batch):
        """The batch the refresh estimates on: ``batch`` itself at ``batch_fraction=1``, else the
        first :meth:`subset_size` rows of each of its tensors (:meth:`split`)."""
        return batch if self.batch_fraction == 1 else self.split(batch)[0]

    def splits(self, step: int) -> bool:
        """Whether to run step ``step``'s training pass in two chunks: the :meth:`subset` first,
        under ``training_pass(step, loss_divisor, subset=True)``, then the rest (see the module
        docstring), so that the finite-difference refresh reuses the subset's gradient (cost ``f``
        forward+backwards). ``True`` on a due step of Hutchinson with ``hvp="finite_difference"``
        and ``batch_fraction < 1``, except under FSDP2 and for a ``model`` with BatchNorm (or other
        running statistics) in training mode: two chunks would change its batch statistics, hence
        the training step, so the pass stays whole and the refresh takes the subset's gradient itself
        (cost ``2f``; one warning). Peeks at the random schedule (draws nothing).
        """
        if not (self.batch_fraction < 1 and self.finite_difference and not self.sharded):
            return False
        if not self.due(step, peek=True):
            return False
        layers = batch_statistics_layers(self.model)
        if layers and not self._warned_split:
            self._warned_split = True
            warnings.warn(
                f"batch_fraction={self.batch_fraction} with hvp=finite_difference: the model has layers with "
                f"batch statistics in training mode ({', '.join(layers[:3])}{', ...' if len(layers) > 3 else ''}), "
                "so the training pass is not split into the subset and the rest (that would change the "
                "training step). Each refresh takes the subset's gradient itself: 2 x batch_fraction "
                "forward+backwards instead of batch_fraction.",
                UserWarning,
                stacklevel=2,
            )
        return not layers

    @contextlib.contextmanager
    def training_pass(self, step: int, loss_divisor: float = 1, *, subset: bool = False):
        """Wrap the training forward+backward (the last micro-batch's) of optimizer step ``step``.

        With ``hvp="finite_difference"``, on a step whose refresh is due, it records the global RNG
        state before the pass (CPU and the parameters' CUDA devices) and this pass's gradient of
        each Hessian parameter (tensor hooks: before DDP's all-reduce and before accumulation into
        ``.grad``); :meth:`maybe_refresh` for the same step then replays the pass at
        ``theta + eps v`` and takes ``H v`` from the two gradients. ``loss_divisor``: the pass
        back-propagates ``loss / loss_divisor`` (micro-batches accumulated; times the ``scaler``'s
        scale with one). Otherwise a no-op.

        ``batch_fraction < 1``: with ``subset=True`` the block is the pass over the :meth:`subset`
        alone (the first chunk when :meth:`splits`), whose gradient the refresh reuses, and
        ``loss_divisor`` is what divides the subset's loss (``accumulate / share``). A pass with
        ``subset=False`` (the whole batch) records only its precision, not its gradient or RNG
        state: the refresh then takes both of the subset's gradients itself.
        Sharded parameters (FSDP2): the pass's gradient is read from ``.grad`` (its value after the
        pass minus the one before, when micro-batches accumulate), already averaged over ranks.

        It also records the precision the pass runs in (:func:`~flatsophia.hessian.precision.record_precision`,
        read when ``model``'s forward starts, so inside the loop's autocast region: autocast dtype,
        TF32, FSDP2's ``param_dtype``). ``hvp="auto"`` is chosen again from it; a finite difference
        after a reduced-precision pass takes its own float32 gradient instead of this pass's.
        """
        self._pass = None
        if not (self.finite_difference and self.due(step, peek=True)):
            yield
            return
        params = self.optimizer.hessian_params()
        if self.batch_fraction < 1 and not subset:  # this pass's gradient is not the subset's
            seen_only: list[TrainingPrecision] = []
            watch = self.model.register_forward_pre_hook(
                lambda module, args: None if seen_only else seen_only.append(record_precision(params, module))
            )
            try:
                yield
            finally:
                watch.remove()
            self._follow_precision(seen_only[0] if seen_only else record_precision(params, self.model))
            return
        # under a GradScaler the pass back-propagates loss * scale / loss_divisor
        divisor = loss_divisor / self.loss_scale()
        record = _TrainingPass(step, capture_rng_state(cuda_devices(params)), len(params), divisor)
        record.precision = record_precision(params, self.model)
        seen: list[TrainingPrecision] = []
        watch = self.model.register_forward_pre_hook(
            lambda module, args: None if seen else seen.append(record_precision(params, module))
        )
        try:
            if self.sharded:
                # FSDP2: the sharded parameters are not in the graph (hooks on them never fire); this
                # pass's gradient, averaged over ranks, is what its backward adds to .grad.
                before = [None if p.grad is None else p.grad.detach().clone() for p in params]
                yield
                record.grads = [
                    None if p.grad is None else p.grad.detach().clone() if b is None else p.grad.detach() - b
                    for p, b in zip(params, before)
                ]
            else:
                handles = [p.register_hook(record.hook(i)) for i, p in enumerate(params) if p.requires_grad]
                try:
                    yield
                finally:
                    for h in handles:
                        h.remove()
        finally:
            watch.remove()
        record.precision = seen[0] if seen else record.precision
        self._pass = record
        self._follow_precision(record.precision)

    def _follow_precision(self, precision: TrainingPrecision) -> None:
        """``hvp="auto"``: the form for ``precision``; an explicit finite difference after a
        reduced-precision pass: one warning that its gradient is not reused."""
        if self.hvp_auto:
            hvp = choose_hvp(precision, self.sharded)
            if hvp != self.estimator.hvp:
                self.estimator.hvp, self.estimator.math_sdpa = hvp, hvp == "autograd"
            if hvp != "finite_difference":
                self._pass = None
        elif not precision.full and not self._warned_precision:
            self._warned_precision = True
            warnings.warn(
                f"hvp=finite_difference: the training pass ran with {precision.describe()}. A finite difference "
                "reusing its gradient is off by a relative 0.15-7 (docs/performance.md), so each refresh takes "
                "both gradients itself in float32 with autocast and TF32 off (one more forward+backward). "
                "hvp='auto' picks the double backward here (the finite difference under FSDP2).",
                UserWarning,
                stacklevel=4,  # the loop's `with refresher.training_pass(...)`
            )

    # -------------------------------------------------------------- estimate
    def forward_backward(
        self,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        loss_divisor: float = 1,
    ) -> tuple[torch.Tensor, Estimates]:
        """One forward for both the training gradient and the Hessian estimate.

        The gradient of ``loss_fn(forward()) / loss_divisor`` is added to ``.grad`` of the
        optimizer's Hessian parameters (as ``backward()`` would; ``loss_divisor`` is the number of
        accumulated micro-batches; times the scale with a ``scaler``, as
        ``scaler.scale(loss).backward()`` would), and the (unscaled) estimate is returned for
        :meth:`maybe_refresh` or :meth:`apply` (not applied yet, so a loop can drop it with a step
        it skips).

        Returns:
            ``(loss, estimates)`` with the undivided loss.
        """
        params = self.optimizer.hessian_params()
        with math_attention(getattr(self.estimator, "math_sdpa", False)):
            logits = forward()
            loss = loss_fn(logits)
            scale = self.loss_scale(loss)
            kwargs = {"loss_scale": scale} if scale != 1 else {}
            grads, estimates = self._run(lambda: self.estimator.from_loss(loss, params, logits=logits, **kwargs))
        for p, g in zip(params, grads):
            if g is None:
                continue
            g = g / loss_divisor if loss_divisor != 1 else g
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return loss, estimates

    def estimate(
        self, forward: Callable[[], torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> Estimates:
        """The estimator's output for ``loss_fn(forward())``, one entry per Hessian parameter.

        With ``hvp="finite_difference"`` it reuses the gradient and RNG state recorded by
        :meth:`training_pass` (consumed here) when that pass ran in full precision; otherwise
        (none recorded, or a reduced-precision pass: then replaying its RNG state) it takes both
        gradients itself. Either way the refresh's passes run in float32 (autocast and TF32 off).
        """
        params = self.optimizer.hessian_params()
        if self.finite_difference:
            record, self._pass = self._pass, None
            with full_precision({p.device.type for p in params}):
                if record is None:
                    return self.estimator(forward, loss_fn, params, module=self.model)
                if not record.precision.full:
                    with replayed_rng(record.rng_state):  # the training pass's dropout masks
                        return self.estimator(forward, loss_fn, params, module=self.model)
                return self.estimator.finite_difference(
                    record.grads,
                    forward,
                    loss_fn,
                    params,
                    rng_state=record.rng_state,
                    module=self.model,
                    loss_divisor=record.loss_divisor,
                )
        # module: whose buffers the extra forward keeps (and, sharded, whose other .grad a backward keeps)
        kwargs = {"module": self.model} if self.model is not None else {}
        if self.loss_scale() != 1:
            kwargs["loss_scale"] = self.loss_scale()
        return self._run(lambda: self.estimator(forward, loss_fn, params, **kwargs))

    def loss_scale(self, loss: torch.Tensor | None = None) -> float:
        """The ``scaler``'s current scale (1 without one, or with a disabled one). Given the
        ``loss`` about to be differentiated, the scale ``scaler.scale(loss)`` would apply (which
        also starts a scaler that has not scaled anything yet, as ``scaler.step`` requires)."""
        if self.scaler is None or not self.scaler.is_enabled():
            return 1.0
        if loss is None:
            return float(self.scaler.get_scale())
        return float(self.scaler.scale(torch.ones((), device=loss.device)))

    def _run(self, fn):
        try:
            return fn()
        except RuntimeError as err:
            if "derivative" in str(err) or "double backward" in str(err) or "not implemented" in str(err):
                raise RuntimeError(
                    f"The {self.estimator_name} Hessian estimate failed for this model ({err}). "
                    f"{type(self.optimizer).__name__} needs a model that supports double backward here; "
                    "use hvp='finite_difference' (Hutchinson: two gradients, no double backward), or a "
                    "first-order optimizer (e.g. torch.optim.AdamW) with it."
                ) from err
            raise

    # ----------------------------------------------------------------- apply
    def apply(self, estimates: Sequence[torch.Tensor | None]) -> bool:
        """Average ``estimates`` across ranks (``reduce``) and hand them to ``update_hessian``.

        Returns whether the optimizer accepted them (it rejects NaN/inf, leaving its state untouched);
        counted in ``refreshes`` / ``skipped``.
        """
        estimates = self._reduce(list(estimates))
        if self.optimizer.update_hessian(estimates):
            self.refreshes += 1
            return True
        self.skipped += 1
        return False

    def _reduce(self, tensors: Estimates) -> Estimates:
        """One ``reduce`` call over all estimates, flattened into one float32 (or wider) vector."""
        if self.reduce is None:
            return tensors
        live = [i for i, t in enumerate(tensors) if t is not None]
        if not live:
            return tensors
        dtype = torch.float32
        for i in live:
            dtype = torch.promote_types(dtype, tensors[i].dtype)
        flat = self.reduce(torch.cat([tensors[i].reshape(-1).to(dtype) for i in live]))
        out = list(tensors)
        offset = 0
        for i in live:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i]).to(tensors[i].dtype)
            offset += n
        return out

    def refresh(self, forward: Callable[[], torch.Tensor], loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Estimate now (a fresh forward through ``forward``) and :meth:`apply` it."""
        return self.apply(self.estimate(forward, loss_fn))

    def maybe_refresh(
        self,
        step: int,
        forward: Callable[[], torch.Tensor],
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        estimates: Sequence[torch.Tensor | None] | None = None,
        *,
        share: float | None = None,
    ) -> bool:
        """Call once per optimizer step taken, before ``optimizer.step()``.

        Applies ``estimates`` when given (from :meth:`forward_backward` on a step where
        :meth:`shares_forward`), else refreshes through ``forward`` if :meth:`due`. Returns whether
        a refresh was applied (accepted or not: see ``refreshes`` and ``skipped``).

        ``share``: with ``batch_fraction < 1``, the :meth:`subset`'s share of the batch's predictions
        (the targets its loss counts; ``len(subset) / len(batch)`` when every example counts alike).
        Gauss-Newton-Bartlett needs it on a due step: its ``ghat**2`` from ``n`` predictions has expectation
        ``1 / n`` times the per-prediction Gauss-Newton diagonal, so the estimate is scaled by
        ``sqrt(share)`` to keep the expectation of the whole batch's (SophiaG's ``bs`` stays the
        step's predictions). Hutchinson's estimate of a mean loss needs no scaling and ignores it.
        """
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            raise ValueError(f"Invalid share: {share!r} (expected a number in (0, 1])")
        gnb_subset = self.estimator_name == "gnb" and self.batch_fraction < 1 and estimates is None
        if share is None and gnb_subset and self.due(step, peek=True):  # peek: the error draws nothing
            raise ValueError(
                f"maybe_refresh with batch_fraction={self.batch_fraction} and the Gauss-Newton-Bartlett estimator "
                "needs share= (the subset's share of the batch's predictions, e.g. len(subset) / len(batch)): "
                "without it the estimate's scale would grow by 1 / batch_fraction"
            )
        if self.estimator is None:
            return False
        if self._pass is not None and self._pass.step != step:
            self._pass = None  # recorded for a step that was not taken
        if estimates is None and not self.due(step):
            self._pass = None
            return False
        if estimates is None:
            estimates = self.estimate(forward, loss_fn)
        if self.estimator_name == "gnb" and share is not None and share != 1:
            root = math.sqrt(share)
            estimates = [None if e is None else e * root for e in estimates]
        self.apply(estimates)
        return True

    # ------------------------------------------------ the loop's one call
    def _init_loop(self, model: nn.Module | None) -> None:
        """What :meth:`backward` needs: the model as passed (the DDP wrapper trains), the unwrapped
        module for refresh forwards and buffers, and ``reduce=distributed_mean`` under DDP."""
        self.training_model = model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            self.model = model.module
            if self.reduce is None:
                self.reduce = distributed_mean
        self._steps: int | None = None  # optimizer steps taken, counted from the first backward
        self._backward_step: int | None = None  # the step of the last backward call
        self._hooks: list = []

    def backward(
        self,
        inputs,
        targets,
        loss_fn: Callable[[torch.Tensor, object], torch.Tensor],
        *,
        loss_divisor: float = 1,
    ) -> torch.Tensor:
        """Use in place of ``loss.backward()``: the training backward, and the refresh when it is due.

        Computes ``loss = loss_fn(model(inputs), targets)`` with ``model`` as passed to the
        refresher (the ``DistributedDataParallel`` wrapper, or the ``fully_shard``-ed module) and
        back-propagates ``loss / loss_divisor`` (times the ``scaler``'s scale with one) into
        ``.grad``. On the first call after an ``optimizer.step()`` whose step index is :meth:`due`,
        it also refreshes the estimate, by whichever of the lower-level paths fits: one shared
        forward (:meth:`forward_backward`) when :meth:`shares_forward`, else the training pass
        (:meth:`training_pass`: the finite difference reuses its gradient) and
        :meth:`maybe_refresh` with a fresh forward of the unwrapped module. The result is that of
        the multi-call loop with those methods, bit for bit.

        The step index is the number of ``optimizer.step()`` calls, counted by an optimizer hook
        from the first call here (starting from :meth:`load_state_dict`'s count, else from the
        optimizer's own ``state[p]["step"]``). Further calls before ``optimizer.step()`` are
        accumulation micro-batches: pass ``loss_divisor`` = their number to every call. Once this
        is used, an ``optimizer.step()`` on a due step with no call here since the previous step
        raises ``RuntimeError`` before anything changes (the refresh would be missing), and so
        does ``optimizer.step()`` with a ``scaler`` (use ``scaler.step(optimizer)``).

        With ``batch_fraction < 1`` the refresh estimates on the first :meth:`subset_size` rows of
        ``inputs`` and ``targets`` (Gauss-Newton-Bartlett's scaled by their share of the rows, see
        :meth:`maybe_refresh`'s ``share``), and the training pass stays whole, whatever the loss: a
        finite difference then takes both of the subset's gradients itself (cost ``2f``
        forward+backwards per refresh; the two-chunk pass of the module docstring costs ``f`` but
        needs a loss that is a mean over examples).

        Returns:
            the undivided, unscaled loss (detached).
        """
        model = self.training_model
        if model is None:
            raise ValueError("HessianRefresher.backward needs model= (the network, as trained: DDP-wrapped or not)")
        if isinstance(loss_divisor, bool) or not isinstance(loss_divisor, (int, float)) or not loss_divisor > 0:
            raise ValueError(f"Invalid loss_divisor: {loss_divisor!r} (expected a positive number of micro-batches)")
        if not self._hooks:
            self._start_counting(model)
        step = self._steps
        first = self._backward_step != step
        self._backward_step = step

        def forward():
            return model(inputs)

        def loss_of(output, targets=targets):
            loss = loss_fn(output, targets)
            if not (isinstance(loss, torch.Tensor) and loss.ndim == 0):
                raise ValueError(
                    f"loss_fn(output, targets) must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}"
                )
            return loss

        if not first or self.estimator is None:
            loss = loss_of(forward())
            self._scaled(loss, loss_divisor).backward()
            return loss.detach()
        share, sub_inputs, loss_sub = None, inputs, loss_of
        if self.batch_fraction < 1:  # the refresh on the first rows; the training pass stays whole
            rows = batch_size((inputs, targets))
            n = self.subset_size(rows)
            (sub_inputs, sub_targets), _ = split_batch((inputs, targets), n)
            share = n / rows
            loss_sub = functools.partial(loss_of, targets=sub_targets)
        refresh_forward = (lambda: self.model(sub_inputs)) if self.model is not model else (lambda: model(sub_inputs))
        if self.shares_forward(step):
            loss, estimates = self.forward_backward(forward, loss_of, loss_divisor)
            self.maybe_refresh(step, refresh_forward, loss_of, estimates)
            return loss.detach()
        with self.training_pass(step, loss_divisor):
            loss = loss_of(forward())
            self._scaled(loss, loss_divisor).backward()
        self.maybe_refresh(step, refresh_forward, loss_sub, share=share)
        return loss.detach()

    def _scaled(self, loss: torch.Tensor, loss_divisor: float) -> torch.Tensor:
        """``loss`` as the training pass back-propagates it: times the scaler's scale, over ``loss_divisor``."""
        if self.scaler is not None and self.scaler.is_enabled():
            loss = self.scaler.scale(loss)
        return loss / loss_divisor if loss_divisor != 1 else loss

    def _start_counting(self, model: nn.Module) -> None:
        """First :meth:`backward`: check the model trains the optimizer's parameters, start the step
        count, and hook ``optimizer.step()`` to count steps and refuse a missing refresh."""
        ours = {id(p) for p in model.parameters()}
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if params and not any(id(p) in ours for p in params):
            raise ValueError(
                "HessianRefresher.backward: model= does not hold the optimizer's parameters; pass the model "
                "the optimizer trains (built with model.parameters())"
            )
        dist = torch.distributed
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ranks > 1 and self.reduce is None and not self.sharded and not any_dtensor(model.parameters()):
            raise ValueError(
                f"HessianRefresher.backward on {ranks} ranks with a model that is neither DistributedDataParallel "
                "nor fully_shard-ed: neither the gradients nor the estimates would be averaged across ranks. Pass "
                "model=DistributedDataParallel(model) (or the fully_shard-ed model), or reduce= to average the "
                "estimates if the loop averages the gradients itself"
            )
        if self._steps is None:
            self._steps = _optimizer_steps(self.optimizer)
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    def _before_step(self, optimizer, args, kwargs) -> None:
        step = self._steps
        if self._backward_step != step and self.estimator is not None and self.due(step, peek=True):
            raise RuntimeError(
                f"optimizer.step() for step {step}, whose Hessian refresh is due, but refresher.backward(...) "
                "was not called since the previous step: call refresher.backward(inputs, targets, loss_fn) "
                "before every optimizer.step() (it refreshes the estimate on due steps)"
            )
        states = getattr(self.scaler, "_per_optimizer_states", None)  # GradScaler's record per optimizer
        if self.scaler is not None and self.scaler.is_enabled() and isinstance(states, dict):
            stage = states[id(optimizer)]["stage"] if id(optimizer) in states else None
            if getattr(stage, "name", "READY") == "READY":  # scaler.step unscales before it steps
                raise RuntimeError(
                    "optimizer.step() with gradients scaled by the refresher's scaler: call "
                    "scaler.step(optimizer) then scaler.update() instead (it unscales them first)"
                )

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._steps += 1

    # ----------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Plain types only (tensors, ints, strings, dicts): loads with ``torch.load(weights_only=True)``."""
        return {
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "schedule_rng": self.rng.get_state(),
            "refreshes": self.refreshes,
            "skipped": self.skipped,
            "optimizer_steps": self._steps,  # backward's step count (None before its first call)
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (the estimator's generators, the schedule's stream, the counters).

        Loads on any machine, whatever device the state was saved on or mapped to by ``torch.load``
        (see :meth:`HessianEstimator.load_state_dict <flatsophia.hessian.base.HessianEstimator.load_state_dict>`).
        """
        if state.get("estimator") is not None and self.estimator is not None:
            self.estimator.load_state_dict(state["estimator"])
        self.rng.set_state(state["schedule_rng"].cpu())  # a CPU generator's state, wherever it was mapped
        self.refreshes = int(state["refreshes"])
        self.skipped = int(state["skipped"])
        if state.get("optimizer_steps") is not None:  # absent from older states: backward counts from the optimizer
            self._steps = int(state["optimizer_steps"])


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Steps the optimizer has taken, from its state (the largest ``state[p]["step"]``; 0 without one)."""
    steps = [s["step"] for s in optimizer.state.values() if isinstance(s, dict) and "step" in s]
    return int(max(float(s) for s in steps)) if steps else 0


class _TrainingPass:
    """What :meth:`HessianRefresher.training_pass` records: the RNG state before the pass and the
    pass's own gradient of each Hessian parameter (``None`` where the loss does not reach it), and
    the precision it ran in."""

    def __init__(self, step: int, rng_state: dict, n: int, loss_divisor: float):
        self.step, self.rng_state, self.loss_divisor = step, rng_state, loss_divisor
        self.grads: Estimates = [None] * n
        self.precision = TrainingPrecision()

    def hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def capture(grad: torch.Tensor) -> None:
            # a copy: the tensor may become .grad, which DDP averages and clipping scales in place
            g = grad.detach().clone()
            self.grads[i] = g if self.grads[i] is None else self.grads[i].add_(g)

        return capture
