"""What the Sophia family shares: state bookkeeping, the step skeleton, the Hessian EMA skeleton, stats."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from flatsophia.sharding import all_reduce_sum, any_dtensor, local, shard_group

from ._common import (
    all_finite,
    check_estimates,
    hessian_params,
    parse_dtype,
    plain_numbers,
    refuse_unsupported,
    state_dtype,
    upgrade_state,
)

#: The group options naming a state buffer's dtype, and the buffer each one sets.
DTYPE_OPTIONS = {"mu_dtype": "exp_avg", "hessian_dtype": "hessian"}


class _SophiaBase(Optimizer):
    """Base of :class:`SophiaG`, :class:`SophiaH` and :class:`FlatSophia` (not an optimizer itself).

    ``step()`` refuses unsupported inputs, then, per group, ``_init_group`` fills lists with the
    parameters that have a gradient and their state (as ``torch.optim``'s optimizers do;
    ``torch.compile`` runs it eagerly) and ``_update_group`` calls the functional step. A subclass
    provides the algorithm through these hooks:

    * ``_check_options(options)``: validate a dict of options (the defaults, every added group;
      NumPy scalars are Python numbers by then);
    * ``_init_state(p, group)``: the parameter's state, created on first use (the buffers named in
      :data:`DTYPE_OPTIONS` in :meth:`_state_dtypes`);
    * ``_update_group(group, params, grads, exp_avgs, hessians, state_steps, masks, stats, **step_kwargs)``:
      call the algorithm's functional step;
    * ``_fold_hessian(state, estimate, group)``: fold one estimate into ``state["hessian"]``;
    * ``_check_step(**step_kwargs)`` (optional): refuse a step once the gradients are known.

    **Half precision**: ``exp_avg`` and ``hessian`` are float32 for bf16/fp16 parameters unless the
    group's ``mu_dtype`` / ``hessian_dtype`` say otherwise, and the kernels compute each update in the
    widest of float32, the parameter's and the state's dtypes, writing the parameter back with one
    rounding; float32 and float64 parameters run exactly as before. :meth:`load_state_dict` keeps
    these dtypes (``torch.optim`` would cast every state tensor to the parameter's dtype).

    **Sharded parameters** (DTensors, e.g. from FSDP2's ``fully_shard``): the state tensors are
    DTensors laid out like their parameters (so ``torch.distributed.checkpoint`` saves them shard by
    shard), the hooks above receive the local shards (the step and the Hessian EMA touch only this
    rank's coordinates, with the same kernels, and gather nothing), and what is global is reduced
    over the shards' process group: the non-finite check of an estimate (one all-reduced flag, so
    every rank skips alike), the step statistics and :meth:`stats` (one all-reduce of a few sums),
    and FlatSophia's threshold (:func:`~flatsophia.optim.flat_sophia.distributed_kth_largest`).
    """

    is_second_order = True

    def __init__(self, params, defaults: dict):
        plain_numbers(defaults)
        self._check_options(defaults)
        super().__init__(params, defaults)
        # Mutated in place only (never rebound): Lightning's optimizer wrapper copies __dict__.
        self._last_step_stats: dict[str, torch.Tensor] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        upgrade_state(self)
        for group in self.param_groups:  # a name such as "bf16" from an older state dict
            for key in DTYPE_OPTIONS:
                if key in group:
                    group[key] = parse_dtype(key, group[key])
        self.__dict__.setdefault("_last_step_stats", {})

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            plain_numbers(self.param_groups[-1])
            self._check_options(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping each state buffer's dtype.

        The base class casts every state tensor but ``step`` to its parameter's dtype. Here
        ``exp_avg`` and ``hessian`` are taken again from the saved tensors in the dtypes the loaded
        groups ask for (:meth:`_state_dtypes`: float32 under bf16/fp16 parameters by default, so
        every bit survives; an older bf16 buffer is widened), and other buffers (FlatSophia's int8
        mask) keep their saved dtype.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        pairs = [(p, g) for g in self.param_groups for p in g["params"]]
        for pid, (p, group) in zip(saved_ids, pairs):
            dtypes = self._state_dtypes(p, group)
            for key, value in saved.get(pid, {}).items():
                if key != "step" and isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=dtypes.get(key, value.dtype))

    def _state_dtypes(self, p: torch.Tensor, group: dict) -> dict[str, torch.dtype]:
        """Dtype of each floating state buffer of ``p`` (``exp_avg``, ``hessian``) under ``group``'s options."""
        return {buffer: state_dtype(group.get(option), p.dtype) for option, buffer in DTYPE_OPTIONS.items()}

    # ------------------------------------------------------------------ hooks
    def _check_options(self, options: dict) -> None:
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        """The parameter's state: a float32 ``step`` and zero ``exp_avg`` and ``hessian`` buffers."""
        state = self.state[p]
        if len(state) == 0:
            dtypes = self._state_dtypes(p, group)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            for key in ("exp_avg", "hessian"):
                state[key] = torch.zeros_like(p, dtype=dtypes[key], memory_format=torch.preserve_format)
        return state

    def _init_group(self, group, params, grads, exp_avgs, hessians, state_steps, masks) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self._init_state(p, group)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            hessians.append(state["hessian"])
            state_steps.append(state["step"])
            if self._masking(group):
                masks.append(state["mask"])

    def _masking(self, group: dict) -> bool:
        """Whether the group's update is divided by a per-parameter ``state["mask"]`` (FlatSophia)."""
        return False

    def _update_group(self, group, params, grads, exp_avgs, hessians, state_steps, masks, stats, **step_kwargs):
        raise NotImplementedError

    def _check_step(self, **step_kwargs) -> None:
        """Refuse a step (``ValueError``) after the closure ran and before anything changes."""

    def _fold_hessian(self, state: dict, estimate: torch.Tensor, group: dict) -> None:
        raise NotImplementedError

    def _after_hessian_update(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Called after a successful :meth:`update_hessian` (FlatSophia rebuilds its mask here)."""

    # ------------------------------------------------------------------- step
    def _step(self, closure: Callable | None, collect_stats: bool, **step_kwargs):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refuse_unsupported(
            type(self).__name__, [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        )
        self._check_step(**step_kwargs)
        stats: list | None = [] if collect_stats else None
        n_total = 0
        groups = None
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, state_steps, masks = [], [], [], [], [], []
            self._init_group(group, params, grads, exp_avgs, hessians, state_steps, masks)
            if not params:
                continue
            if stats is not None:
                n_total += sum(p.numel() for p in params)  # a DTensor's numel is the global one
            if any_dtensor(params):  # sharded: the kernels run on this rank's shards
                groups = shard_group(params + grads)
                params, grads, exp_avgs, hessians, masks = (
                    [local(t) for t in ts] for ts in (params, grads, exp_avgs, hessians, masks)
                )
            self._update_group(group, params, grads, exp_avgs, hessians, state_steps, masks, stats, **step_kwargs)
        if stats and n_total:
            kept, sq = sum(kept for kept, _ in stats), sum(sq for _, sq in stats)
            if groups:
                kept, sq = _global_sums([kept, sq], groups)
            self._last_step_stats.clear()
            self._last_step_stats["win_rate"] = kept.float() / n_total
            self._last_step_stats["update_rms"] = (sq / n_total).float().sqrt()
        return loss

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, collect_stats: bool = False):
        """One update with the current Hessian EMA.

        Args:
            closure: optional closure re-evaluating the loss (run with gradients enabled).
            collect_stats: also record the win rate (fraction of coordinates not clipped) and the
                RMS of the update direction (before ``lr``) as 0-d tensors for :meth:`stats`;
                no host sync.
        """
        return self._step(closure, collect_stats)

    # --------------------------------------------------------------- hessian
    def hessian_params(self) -> list[torch.Tensor]:
        """Parameters :meth:`update_hessian` expects estimates for (``requires_grad``, group order)."""
        return hessian_params(self.param_groups)

    def _estimate_pairs(self, estimates: Sequence[torch.Tensor | None]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(parameter, estimate)`` for the non-``None`` entries, after checking them all."""
        params = self.hessian_params()
        check_estimates(params, estimates)
        pairs = [(p, e) for p, e in zip(params, estimates) if e is not None]
        refuse_unsupported(type(self).__name__, pairs)
        return pairs

    def _fold_estimates(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Fold the estimates into the Hessian EMA; ``False`` (warning, state untouched) if one is not finite."""
        sharded = any_dtensor(p for p, _ in pairs)
        groups = shard_group([t for pair in pairs for t in pair]) if sharded else None
        if not all_finite((e for _, e in pairs), groups):
            warnings.warn(
                f"{type(self).__name__}.update_hessian: the Hessian estimate holds NaN/inf; skipped (state unchanged).",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for p, e in pairs:
            group = group_of[id(p)]
            state = self._init_state(p, group)
            if sharded:  # the same in-place updates on this rank's shards
                state, e = {key: local(v) for key, v in state.items()}, local(e)
            self._fold_hessian(state, e, group)
        self._after_hessian_update(pairs)
        return True

    # ----------------------------------------------------------------- stats
    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics as 0-d tensors (``.item()`` is the only host sync).

        ``win_rate`` (fraction of coordinates not clipped) and ``update_rms`` (RMS of the update
        direction before ``lr``) come from the last ``step(collect_stats=True)``; ``hessian_mean``
        and ``hessian_neg_frac`` describe the current Hessian EMA.
        """
        out = dict(self._last_step_stats)
        hs = [s["hessian"] for s in self.state.values() if "hessian" in s]
        if hs:
            n = sum(h.numel() for h in hs)  # global counts for DTensors
            total = sum(local(h).float().sum() for h in hs)
            neg = sum((local(h) < 0).sum() for h in hs)
            groups = shard_group(hs)
            if groups:
                total, neg = _global_sums([total, neg], groups)
            out["hessian_mean"] = total.float() / n
            out["hessian_neg_frac"] = neg.float() / n
        return out


def _global_sums(values: list[torch.Tensor], groups) -> list[torch.Tensor]:
    """Per-rank 0-d sums summed over the shards' process groups (one all-reduce, in float64)."""
    flat = torch.stack([v.to(torch.float64) for v in values])
    all_reduce_sum(flat, groups)
    return list(flat.unbind())
