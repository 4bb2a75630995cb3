"""SOAP: Adam run in the eigenbasis of Shampoo's Kronecker-factored preconditioner.

Paper: Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade, "SOAP: Improving and
Stabilizing Shampoo using Adam", arXiv:2409.11321 (2024).
Reference code: github.com/nikhilvyas/SOAP (``soap.py``, MIT). This is an independent
implementation of the same update: it follows the reference step for step (first-call skip,
weight decay after the update, eigenvalue re-sort and one power iteration + QR on refresh steps,
eigen work on float32 factors) and matches it in float64 to rounding before the first refresh.
The differences are listed in the :class:`SOAP` docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer

from ._common import (
    HALF_DTYPES,
    check_betas,
    check_bool,
    check_int,
    check_lr,
    check_nonneg,
    check_positive,
    lr_value,
    plain_numbers,
    refuse_unsupported,
    state_dtype,
    upgrade_state,
)

__all__ = ["SOAP", "merged_shape"]

DATA_FORMATS = ("channels_first", "channels_last")

#: Added to the factor's diagonal before the first eigendecomposition (as in the reference).
_EIGH_DIAG = 1e-30
#: Guard of the per-layer RMS normalisation (``normalize_grads``), as in the reference.
_NORM_EPS = 1e-30
#: Relative diagonal jitters tried, in float64, after ``torch.linalg.eigh`` failed.
_EIGH_JITTERS = (1e-10, 1e-7, 1e-4)


def merged_shape(shape: Sequence[int], max_dim: int) -> tuple[int, ...]:
    """Shape seen by the preconditioner with ``merge_dims=True``.

    Neighbouring dimensions are multiplied together while the product stays <= ``max_dim``; a
    dimension that would push the running product over the limit starts a new group (one that is
    larger than ``max_dim`` by itself stays alone and gets no factor). Size-1 dimensions vanish,
    and a 0-d or all-ones shape becomes ``(1,)``. Same grouping as the reference's ``merge_dims``.
    """
    out: list[int] = []
    run = 1
    for d in shape:
        if run * d <= max_dim:
            run *= d
        elif run > 1:
            out.append(run)
            run = d
        else:
            out.append(d)
    if run > 1 or not out:
        out.append(run)
    return tuple(out)


class _Layout:
    """How one parameter is viewed by the preconditioner (its "work" shape) and which dims have factors."""

    __slots__ = ("channels_last", "work_shape", "factored", "any_factor", "reshaped")

    def __init__(self, shape: torch.Size, merge: bool, channels_last: bool, max_dim: int, precondition_1d: bool):
        self.channels_last = merge and channels_last and len(shape) == 4
        if self.channels_last:
            shape = torch.Size((shape[0], shape[3], shape[1], shape[2]))
        self.work_shape = merged_shape(shape, max_dim) if merge else tuple(shape)
        if len(shape) == 1:
            # 1-D tensors are preconditioned only on request.
            self.factored = (precondition_1d and shape[0] <= max_dim,)
        else:
            self.factored = tuple(d <= max_dim for d in self.work_shape)
        self.any_factor = any(self.factored)
        self.reshaped = self.channels_last or self.work_shape != tuple(shape)

    def to_work(self, t: torch.Tensor) -> torch.Tensor:
        if not self.reshaped:
            return t
        if self.channels_last:
            t = t.permute(0, 3, 1, 2)
        return t.reshape(self.work_shape)

    def from_work(self, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if not self.reshaped:
            return t
        if self.channels_last:
            return t.reshape(shape[0], shape[3], shape[1], shape[2]).permute(0, 2, 3, 1)
        return t.reshape(shape)


def _project(x: torch.Tensor, mats: Sequence[torch.Tensor | None], back: bool) -> torch.Tensor:
    """Mode products with every eigenbasis: ``x ×_k Q_k^T`` (into the basis) or ``x ×_k Q_k`` (back).

    Each round contracts the leading dimension with one matrix and appends the result as the last
    dimension, so after ``ndim`` rounds the order is restored; every round is one ``matmul`` on a
    2-D view (no copies for factored dims; unfactored dims are rotated with one contiguous copy).
    """
    if all(q is None for q in mats):
        return x
    for q in mats:
        d = x.shape[0]
        rest = x.shape[1:]
        xm = x.reshape(d, -1).T
        if q is None:
            y = xm.contiguous()
        else:
            y = xm @ (q.T if back else q)
        x = y.view(*rest, d)
    return x


def _accumulate(factors: Sequence[torch.Tensor | None], g: torch.Tensor, beta: float) -> None:
    """``L_k <- beta * L_k + (1 - beta) * G_(k) G_(k)^T`` for every factor (``G_(k)``: mode-k unfolding)."""
    for k, m in enumerate(factors):
        if m is None:
            continue
        gk = g.movedim(k, 0).reshape(g.shape[k], -1)
        m.addmm_(gk, gk.T, beta=beta, alpha=1.0 - beta)


def _eigh_fallback(m: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (columns by descending eigenvalue) after ``eigh`` failed: float64 with growing
    jitter, else the identity."""
    a = m.double()
    if bool(torch.isfinite(a).all()):
        scale = float(a.diagonal().abs().mean()) or 1.0
        for rel in _EIGH_JITTERS:
            b = a.clone()
            b.diagonal().add_(rel * scale)
            try:
                q = torch.linalg.eigh(b).eigenvectors
            except RuntimeError:
                continue
            if bool(torch.isfinite(q).all()):
                warnings.warn(
                    f"SOAP: torch.linalg.eigh failed on a {m.shape[0]}x{m.shape[0]} factor; "
                    f"used float64 with diagonal jitter {rel:g} x mean|diag|.",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return q.flip(1)
    warnings.warn(
        f"SOAP: no eigenbasis for a {m.shape[0]}x{m.shape[0]} factor (non-finite or eigh failed); "
        "using the identity until the next refresh.",
        RuntimeWarning,
        stacklevel=4,
    )
    return torch.eye(m.shape[0], dtype=torch.float64, device=m.device)


def _eigenbasis(m: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the symmetric factor ``m``, columns by descending eigenvalue, in ``m.dtype``.

    As in the reference, the factor is rounded to float32 and ``1e-30`` is added to its diagonal;
    the solve runs in the factor's dtype (float64 factors: float64, which is what the reference
    does under ``torch.set_default_dtype(torch.float64)``).
    """
    a = m.float().to(m.dtype, copy=True)
    a.diagonal().add_(_EIGH_DIAG)
    try:
        q = torch.linalg.eigh(a).eigenvectors
        if not bool(torch.isfinite(q).all()):
            raise RuntimeError("non-finite eigenvectors")
    except RuntimeError:
        return _eigh_fallback(m).to(m.dtype)
    return q.flip(1).to(m.dtype)


def _refresh(
    factors: Sequence[torch.Tensor | None], bases: list[torch.Tensor | None], exp_avg_sq: torch.Tensor
) -> torch.Tensor:
    """One power iteration + QR per factor (in float32, as in the reference).

    Columns of the old basis are first re-sorted by the estimated eigenvalues
    ``diag(Q^T L Q)`` (descending) and ``exp_avg_sq`` is permuted the same way along that dim, so
    every second moment stays with its eigenvector. Updates ``bases`` in place; returns the
    permuted ``exp_avg_sq``.
    """
    for k, (m, q) in enumerate(zip(factors, bases)):
        if m is None:
            continue
        m32, q32 = m.float(), q.float()
        mq = m32 @ q32
        est = (q32 * mq).sum(0)  # diag(Q^T L Q)
        order = torch.argsort(est, descending=True)
        exp_avg_sq = exp_avg_sq.index_select(k, order)
        bases[k] = torch.linalg.qr(mq.index_select(1, order)).Q.to(m.dtype)
    return exp_avg_sq


def _soap_direction(
    state: dict, g: torch.Tensor, beta1: float, beta2: float, eps: float, normalize: bool
) -> torch.Tensor:
    """Adam moments on the projected gradient; returns ``(m / (sqrt(v) + eps))`` rotated back (work shape)."""
    bases = state["Q"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    g_hat = _project(g, bases, back=False)
    exp_avg.lerp_(g_hat, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g_hat, g_hat, value=1.0 - beta2)
    direction = exp_avg_sq.sqrt().add_(eps)
    torch.div(exp_avg, direction, out=direction)
    update = _project(direction, bases, back=True)
    if normalize:
        update = update / update.square().mean().sqrt().add_(_NORM_EPS)
    return update


def _compose_rotations(exp_avg: torch.Tensor, bases: Sequence[torch.Tensor | None]) -> bool:
    """Whether moving the first moment to new bases is cheaper through ``Q_old^T Q_new`` (one d x d
    product per factor, then one rotation) than rotating it back and forward: ``sum d^3 < N sum d``.
    Never for matrices; for conv kernels (e.g. ``(C, C, 3, 3)``) about half the work."""
    dims = [q.shape[0] for q in bases if q is not None]
    return sum(d**3 for d in dims) < exp_avg.numel() * sum(dims)


def _update_preconditioner(state: dict, g: torch.Tensor, beta: float, refresh: bool) -> None:
    """Fold ``g`` into the factors; on refresh steps re-sort + QR the bases and re-express the moments."""
    bases = state["Q"]
    compose = refresh and _compose_rotations(state["exp_avg"], bases)
    if refresh:
        old = list(bases)
        if not compose:
            exp_avg = _project(state["exp_avg"], old, back=True)  # to the parameter's own basis
    _accumulate(state["GG"], g, beta)
    if refresh:
        state["exp_avg_sq"] = _refresh(state["GG"], bases, state["exp_avg_sq"])
        if compose:
            # m x_k Q_old x_k Q_new^T = m x_k (Q_new^T Q_old), i.e. _project(forward) by Q_old^T Q_new
            moves = [None if q is None else q.T @ q_new for q, q_new in zip(old, bases)]
            state["exp_avg"] = _project(state["exp_avg"], moves, back=False)
        else:
            state["exp_avg"] = _project(exp_avg, bases, back=False)


def _adam_foreach(params, grads, exp_avgs, exp_avg_sqs, step_sizes, beta1, beta2, eps, decay) -> None:
    """The same update for tensors without any factor (plain Adam, decay after the step), batched."""
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, [-s for s in step_sizes])
    if decay > 0:
        torch._foreach_mul_(params, 1.0 - decay)


def _check_shampoo_beta(value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value == -1 or 0.0 <= value < 1.0):
        raise ValueError(f"Invalid shampoo_beta: {value!r} (expected -1, meaning betas[1], or a number in [0, 1))")


def _validate(group: dict) -> None:
    plain_numbers(group)
    check_lr(group["lr"])
    check_betas(group["betas"])
    _check_shampoo_beta(group["shampoo_beta"])
    check_positive("eps", group["eps"])
    check_nonneg("weight_decay", group["weight_decay"])
    check_int("precondition_frequency", group["precondition_frequency"], 1)
    check_int("max_precond_dim", group["max_precond_dim"], 0)
    for name in ("merge_dims", "precondition_1d", "normalize_grads", "correct_bias"):
        check_bool(name, group[name])
    if group["data_format"] not in DATA_FORMATS:
        raise ValueError(
            f"Invalid data_format: {group['data_format']!r} (expected 'channels_first' or 'channels_last')"
        )


class SOAP(Optimizer):
    r"""SOAP (Shampoo with Adam in the Preconditioner's eigenbasis), as in the authors' ``soap.py``.

    For a parameter whose gradient :math:`G` (viewed in its work shape, see ``merge_dims``) has
    :math:`N` dims, dimension :math:`k` of size :math:`d_k \le` ``max_precond_dim`` carries a
    factor :math:`L_k \in \mathbb{R}^{d_k\times d_k}` and an orthogonal basis :math:`Q_k`; other
    dims use :math:`Q_k = I`. :math:`G_{(k)}` is the mode-:math:`k` unfolding and
    :math:`\times_k` the mode-:math:`k` product. With :math:`\beta_s` = ``shampoo_beta`` (or
    :math:`\beta_2` when it is -1):

    .. math::
        \begin{aligned}
        &\textbf{first call: } L_k \leftarrow (1-\beta_s)\, G_{(k)} G_{(k)}^\top,\quad
            Q_k \leftarrow \mathrm{eigvecs}(L_k)\ \text{(descending eigenvalues)};
            \ \text{no parameter update.}\\
        &\textbf{later calls: } t \leftarrow t+1\\
        &\hat G = G \times_1 Q_1^\top \cdots \times_N Q_N^\top\\
        &m \leftarrow \beta_1 m + (1-\beta_1)\hat G,\qquad
            v \leftarrow \beta_2 v + (1-\beta_2)\hat G \odot \hat G\\
        &U = \big(m / (\sqrt v + \epsilon)\big) \times_1 Q_1 \cdots \times_N Q_N,\qquad
            U \leftarrow U / (\mathrm{rms}(U) + 10^{-30})\ \text{(normalize\_grads)}\\
        &\theta \leftarrow \theta - \eta\,\tfrac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\, U
            \quad(\text{factor dropped if not correct\_bias})\\
        &\theta \leftarrow \theta - \eta\lambda\,\theta \qquad\text{(decoupled, on the updated } \theta)\\
        &L_k \leftarrow \beta_s L_k + (1-\beta_s)\, G_{(k)} G_{(k)}^\top\\
        &\text{if } t \bmod f = 0\text{, for each factored } k:\
            \pi = \mathrm{argsort}_\downarrow \mathrm{diag}(Q_k^\top L_k Q_k),\
            Q_k \leftarrow Q_k[:, \pi],\ v \leftarrow v[\ldots, \pi, \ldots]\ (\text{dim } k),\\
        &\qquad Q_k \leftarrow \mathrm{qr}(L_k Q_k).Q,\quad
            m \text{ re-expressed in the new bases: } m \leftarrow (m \times_k Q_k^{\text{old}})
            \times_k Q_k^{\top}
        \end{aligned}

    :math:`m` and :math:`v` live in the eigenbasis. As in the reference, the eigen work runs on
    float32 copies of the factors: the first ``eigh`` solves in the factor's dtype (float32, or
    float64 for float64 parameters, which is what the reference does under
    ``torch.set_default_dtype(torch.float64)``) on the float32-rounded factor, and the re-sort,
    power iteration and QR run in float32; the bases are stored in the state dtype. Tensors
    without any factor (1-D ones by default, or all with ``max_precond_dim=0``) get plain Adam,
    batched with ``torch._foreach_*`` ops.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (default 3e-3); a number, or a 1-element tensor (read
            once per step) as in ``torch.optim``.
        betas: :math:`(\beta_1, \beta_2)` of the Adam moments (default (0.95, 0.95)).
        shampoo_beta: EMA coefficient :math:`\beta_s` of the factors; -1 (default) uses
            :math:`\beta_2`. Otherwise in [0, 1), independent of :math:`\beta_2`.
        eps: Adam's :math:`\epsilon` (default 1e-8).
        weight_decay: decoupled weight decay :math:`\lambda` (default 0.01).
        precondition_frequency: :math:`f`, steps between eigenbasis refreshes (default 10).
        max_precond_dim: largest dimension that gets a factor (default 10000); larger dims are
            left unrotated. ``0`` gives plain Adam (with the first-call skip).
        merge_dims: merge neighbouring dims while their product stays <= ``max_precond_dim``
            (see :func:`merged_shape`) before building factors (default False).
        precondition_1d: also give 1-D parameters (biases, norms) a factor (default False).
        normalize_grads: divide each update by its RMS (default False).
        data_format: ``"channels_first"`` (default) or ``"channels_last"``: with ``merge_dims``,
            4-D tensors in ``channels_last`` are viewed as ``(d0, d3, d1, d2)`` before merging.
        correct_bias: Adam bias correction of the step size (default True).

    Deliberate differences from the reference (none changes the update of a float32/float64
    parameter beyond rounding):
        * Half-precision (bf16/fp16) parameters work: their state (moments, factors, bases) is
          float32 and the update is computed in float32 (the reference crashes: its factors
          follow the default dtype, and ``torch.linalg.qr`` has no bf16 kernel).
          ``load_state_dict`` keeps that float32 state (plain ``torch.optim`` would cast it to the
          parameter's dtype). Float64 parameters keep float64 state whatever the default dtype.
        * The first moment is rotated into a new basis only when a basis changes; the reference
          projects it back and forth with the same basis on every step, which is the identity up
          to rounding. (Its bases after a refresh are orthogonal to float32 accuracy only, so in
          a float64 comparison this round trip is what separates the two by ~1e-6 after the
          first refresh, while they agree to ~1e-15 before it.) Where it is cheaper (tensors with
          :math:`\sum_k d_k^3 < N \sum_k d_k`, e.g. conv kernels; never matrices) the move to
          the new bases goes through :math:`Q_k^{\text{old}\top} Q_k` instead of a round trip
          through the parameter's basis; the same map, rounded differently.
        * A failing ``torch.linalg.eigh`` is retried in float64 with growing diagonal jitter, then
          falls back to the identity basis (with a ``RuntimeWarning``); the reference retries once
          in float64 and otherwise raises.
        * With ``merge_dims=True`` the moments are stored in the merged (work) shape.
        * The estimated eigenvalues are read off the power-iteration product
          (:math:`\mathrm{colsum}(Q \odot L Q)`) rather than a separate :math:`Q^\top L Q`;
          the factors' EMA is one ``addmm_``; weight decay is ``p *= 1 - lr*wd``. Rounding only.
        * ``data_format`` is a per-group option; every hyperparameter is validated (the
          reference accepts any ``shampoo_beta``); zero-size parameters are skipped; sparse or
          complex gradients raise ``RuntimeError``.
    """

    is_second_order = False
    hessian_estimator = "none"

    def __init__(
        self,
        params,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.95, 0.95),
        shampoo_beta: float = -1,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        precondition_frequency: int = 10,
        max_precond_dim: int = 10000,
        merge_dims: bool = False,
        precondition_1d: bool = False,
        normalize_grads: bool = False,
        data_format: str = "channels_first",
        correct_bias: bool = True,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            shampoo_beta=shampoo_beta,
            eps=eps,
            weight_decay=weight_decay,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            merge_dims=merge_dims,
            precondition_1d=precondition_1d,
            normalize_grads=normalize_grads,
            data_format=data_format,
            correct_bias=correct_bias,
        )
        _validate(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            _validate(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        upgrade_state(self)  # plain-number steps, options added later (data_format)

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but half-precision parameters keep float32 state."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if p.dtype in HALF_DTYPES and pid in saved:
                self.state[p] = {k: _to_state(v, p.device, torch.float32, k) for k, v in saved[pid].items()}

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One SOAP step (the first call per parameter only builds its preconditioner)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refuse_unsupported("SOAP", [(p, p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None])
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
            lr, wd = lr_value(group["lr"]), group["weight_decay"]
            key = (
                group["merge_dims"],
                group["data_format"] == "channels_last",
                group["max_precond_dim"],
                group["precondition_1d"],
            )
            plain: list[tuple] = []  # unpreconditioned tensors, updated together with foreach ops
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                grad = p.grad
                layout = self._layout(p.shape, key)
                sdtype = state_dtype(None, p.dtype)
                g = layout.to_work(grad if grad.dtype == sdtype else grad.to(sdtype))
                state = self.state[p]
                if "Q" not in state:
                    self._init_state(state, g, layout, sb)
                    continue  # the first gradient only builds the preconditioner

                step_t = state["step"]
                step_t += 1
                t = int(step_t.item())
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                if (
                    not layout.any_factor
                    and not group["normalize_grads"]
                    and p.dtype == sdtype
                    and not layout.channels_last
                    and p.is_contiguous()
                ):
                    pw = p.view(layout.work_shape) if layout.reshaped else p
                    plain.append((pw, g, state["exp_avg"], state["exp_avg_sq"], step_size))
                    continue
                update = _soap_direction(state, g, beta1, beta2, group["eps"], group["normalize_grads"])
                p.add_(layout.from_work(update, p.shape), alpha=-step_size)
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                # The preconditioner sees this gradient only after it was used (as in the reference).
                if layout.any_factor:
                    _update_preconditioner(state, g, sb, refresh=t % group["precondition_frequency"] == 0)
            if plain:
                _adam_foreach(*zip(*plain), beta1, beta2, group["eps"], lr * wd)
        return loss

    def _layout(self, shape: torch.Size, key: tuple) -> _Layout:
        """The (cached) preconditioner layout of a parameter shape under a group's settings."""
        cache = self.__dict__.setdefault("_layouts", {})
        layout = cache.get((shape, key))
        if layout is None:
            layout = cache[(shape, key)] = _Layout(shape, *key)
        return layout

    @staticmethod
    def _init_state(state: dict, g: torch.Tensor, layout: _Layout, sb: float) -> None:
        shape = layout.work_shape
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros(shape, dtype=g.dtype, device=g.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=g.dtype, device=g.device)
        factors = [
            torch.zeros(d, d, dtype=g.dtype, device=g.device) if f else None for d, f in zip(shape, layout.factored)
        ]
        _accumulate(factors, g, sb)
        state["GG"] = factors
        state["Q"] = [None if m is None else _eigenbasis(m) for m in factors]


def _to_state(value, device: torch.device, dtype: torch.dtype, key: str):
    """A saved state value on ``device``, floating tensors in ``dtype`` (lists recursively; ``step`` as is)."""
    if isinstance(value, torch.Tensor):
        if key == "step":
            return value
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_state(v, device, dtype, key) for v in value)
    return value
