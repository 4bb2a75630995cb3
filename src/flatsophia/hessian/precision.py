"""The precision a training gradient was made in, and the Hessian-vector product that suits it.

A finite-difference ``H v = (g(theta + eps v) - g(theta)) / eps`` divides the rounding error of the
two gradients by ``eps`` (a relative 3.5e-4 of the weights in float32). Reusing the training step's
``g(theta)`` is therefore only sound when that gradient was computed in full float32/float64
arithmetic. Measured on CPU against the exact float64 product (``python scripts/hvp_precision.py``,
docs/results/hvp_precision; an MLP and a small GPT), the relative error of ``v * Hv`` when the
training gradient is reused is 1.2-6.9 under bf16 autocast, 0.15-0.76 with fp16 autocast or TF32
matmuls and 1.7-6.1 with FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16)``: a bias, which
Sophia's EMA does not average out, above the 0.22 of the EMA's own noise. Taking both gradients in float32 (with
autocast and TF32 off; one more forward+backward) brings it back to 1e-3, and the double backward at
the training precision is within 1.3% (bf16) and 0.1% (fp16, TF32).

:func:`record_precision` reads what the pass that produced a gradient ran in (the refresher calls it
in :meth:`~flatsophia.hessian.refresh.HessianRefresher.training_pass`), :func:`choose_hvp` is the
``hvp="auto"`` rule shared by the library and the template, and :func:`full_precision` is the
context in which the refresh recomputes both gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TrainingPrecision", "choose_hvp", "full_precision", "record_precision"]

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TrainingPrecision:
    """What a training pass's arithmetic was rounded to (all empty/false: full float32/float64).

    Attributes:
        autocast: the autocast dtype the forward ran under (``None``: autocast off).
        param_dtype: a half-precision dtype the parameters were computed in: the module's FSDP2
            ``MixedPrecisionPolicy.param_dtype``, or half-precision parameters (``None``: neither).
        tf32_matmul: float32 matrix products on CUDA may use TF32 (``torch.get_float32_matmul_precision()``
            other than ``"highest"``, i.e. ``torch.backends.cuda.matmul.allow_tf32``).
        tf32_conv: float32 cuDNN convolutions may use TF32 (``torch.backends.cudnn.allow_tf32``, the
            default) and the module has convolutions on CUDA.
        fsdp_policy: whether the dtype in ``param_dtype`` comes from an FSDP2 policy (which then
            also applies to every pass a refresh takes).
    """

    autocast: torch.dtype | None = None
    param_dtype: torch.dtype | None = None
    tf32_matmul: bool = False
    tf32_conv: bool = False
    fsdp_policy: bool = False

    @property
    def full(self) -> bool:
        """Whether the gradient is a float32/float64 one (a finite difference may reuse it)."""
        return self.autocast is None and self.param_dtype is None and not (self.tf32_matmul or self.tf32_conv)

    def describe(self) -> str:
        parts = []
        if self.autocast is not None:
            parts.append(f"{_name(self.autocast)} autocast")
        if self.param_dtype is not None:
            where = "FSDP2 MixedPrecisionPolicy param_dtype" if self.fsdp_policy else "parameters"
            parts.append(f"{where}={_name(self.param_dtype)}")
        if self.tf32_matmul:
            parts.append("TF32 matmuls (torch.get_float32_matmul_precision() != 'highest')")
        if self.tf32_conv:
            parts.append("TF32 cuDNN convolutions (torch.backends.cudnn.allow_tf32)")
        return ", ".join(parts) or "full precision"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fsdp_param_dtype(module: nn.Module | None) -> torch.dtype | None:
    """The half-precision ``param_dtype`` of any FSDP2 ``fully_shard``-ed submodule of ``module``."""
    if module is None:
        return None
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        dtype = getattr(getattr(get_state(), "_mp_policy", None), "param_dtype", None)
        if dtype in _HALF:
            return dtype
    return None


def _device_types(params: list[torch.Tensor]) -> list[str]:
    return sorted({p.device.type for p in params})


def record_precision(params: Iterable[torch.Tensor], module: nn.Module | None = None) -> TrainingPrecision:
    """The precision a forward+backward of ``module`` over ``params`` runs in right now.

    Call it where the training forward runs (inside its autocast region). TF32 counts only for
    parameters on CUDA (it is a CUDA setting); cuDNN's only when ``module`` has a convolution.
    """
    params = list(params)
    devices = _device_types(params)
    autocast = next((torch.get_autocast_dtype(d) for d in devices if torch.is_autocast_enabled(d)), None)
    fsdp = _fsdp_param_dtype(module)
    half = next((p.dtype for p in params if p.dtype in _HALF), None)
    cuda = "cuda" in devices
    convs = module is not None and any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return TrainingPrecision(
        autocast=autocast,
        param_dtype=fsdp or half,
        tf32_matmul=cuda
        and (torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32),
        tf32_conv=cuda and convs and torch.backends.cudnn.allow_tf32,
        fsdp_policy=fsdp is not None,
    )


#: Why no Hessian-vector product runs under FSDP2 with half-precision parameters.
SHARDED_HALF = (
    "Hutchinson cannot estimate the Hessian of a model sharded by FSDP2 and computed in {dtype} ({where}): the "
    "double backward does not run through FSDP, and the finite difference needs gradients in float32 (from "
    "{dtype} gradients its relative error is 1.7-6, docs/performance.md), which that setting does not allow. Use "
    "float32 parameters with autocast instead (then the finite difference takes its gradients in float32), or "
    "SophiaG (Gauss-Newton-Bartlett)."
)


def choose_hvp(precision: TrainingPrecision, sharded: bool = False) -> str:
    """``hvp="auto"``: the Hessian-vector product for a training pass in ``precision``.

    - full precision: ``"finite_difference"`` reusing the training gradient (one extra
      forward+backward per refresh, within 0.6% of the exact product);
    - reduced precision, unsharded: ``"autograd"``, the double backward at the training precision
      (within 1.4% under bf16 autocast, 0.15% with fp16 or TF32; it can share the training forward);
    - reduced precision, sharded (FSDP2 runs no double backward): ``"finite_difference"``, which then
      takes both gradients in float32 with autocast and TF32 off (two extra passes, within 0.6%);
      with half-precision parameters (an FSDP2 ``param_dtype``) nothing runs (``ValueError``).

    Figures: ``python scripts/hvp_precision.py`` (docs/results/hvp_precision).
    """
    if precision.full:
        return "finite_difference"
    if not sharded:
        return "autograd"
    if precision.param_dtype is not None:
        where = "MixedPrecisionPolicy param_dtype" if precision.fsdp_policy else "parameters"
        raise ValueError(SHARDED_HALF.format(dtype=_name(precision.param_dtype), where=where))
    return "finite_difference"


@contextlib.contextmanager
def full_precision(device_types: Iterable[str] = ("cpu", "cuda")):
    """Autocast off on ``device_types`` and TF32 off (matmuls and cuDNN), restored on exit."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with contextlib.ExitStack() as stack:
        for d in sorted(set(device_types)):
            with contextlib.suppress(RuntimeError):  # a device type without autocast
                stack.enter_context(torch.autocast(d, enabled=False))
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(matmul)
            torch.backends.cudnn.allow_tf32 = cudnn
