"""How accurate is each Hessian-vector product when the training pass runs in reduced precision?

For each training precision (float32, bf16 autocast, fp16 autocast with loss scaling, TF32 matmuls,
FSDP2 with ``MixedPrecisionPolicy(param_dtype=bfloat16)``) and each way of getting Hutchinson's
``v * (H v)``, this measures the relative L2 error against the exact product (forward-over-reverse
in float64 at the same weights, torch.func) next to Hutchinson's own probe noise, on CPU::

    python scripts/hvp_precision.py --out docs/results/hvp_precision

The forms (``FORMS``):

- ``fd_reuse``: what the finite difference did before the training precision was recorded: the
  training pass's gradient ``g(theta)`` (at the training precision) reused, ``g(theta + eps v)``
  taken by the refresh (outside autocast: float32; TF32 and FSDP2's policy are global, so at the
  training precision), ``c = sqrt(eps_float32)``.
- ``fd_forward_p`` / ``fd_central_p``: both gradients at the training precision, forward resp.
  central difference, with the best relative step ``c`` of ``C_GRID`` in hindsight (an optimistic
  figure for a finite difference at that precision).
- ``fd_float32``: both gradients recomputed in float32 with autocast and TF32 off (one more
  forward+backward than ``fd_reuse``), ``c = sqrt(eps_float32)``.
- ``autograd_p``: the double backward at the training precision (FSDP2 cannot run it: listed for
  comparison only).

Errors: ``err_1`` is the median over probes of ``||d_form - d_exact|| / ||d_exact||`` for one probe;
``err_k`` the same for the mean of all ``k`` probes (a bias stays, noise shrinks like ``1/sqrt(k)``).
Probe noise: ``noise_1`` is the root-mean-square over probes of ``||d_exact - diag H|| / ||diag H||``
(exact diagonal from the full float64 Hessian), the error one Gaussian probe makes by design.

TF32 is emulated on CPU by rounding the float32 inputs of every matrix product and convolution
(forward and backward: ``aten.mm``/``addmm``/``bmm``/``baddbmm``/``convolution[_backward]``) to 10
mantissa bits, as NVIDIA's tensor cores do; attention runs in the math kernel so that its products
are rounded too. FSDP2's policy is emulated by bfloat16 copies of the parameters (and inputs) for
the forward and backward, gradients cast back to float32, as FSDP2 does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from flatsophia.models.components.gpt import GPT

aten = torch.ops.aten
PRECISIONS = ("float32", "bf16_autocast", "fp16_autocast_scaled", "tf32", "fsdp2_bf16_params")
FORMS = ("fd_reuse", "fd_forward_p", "fd_central_p", "fd_float32", "autograd_p")
C_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
C_FLOAT32 = math.sqrt(torch.finfo(torch.float32).eps)
#: Sophia's EMA of the estimates (beta2 = 0.99) averages about (1 + beta2) / (1 - beta2) = 199 of them,
#: which leaves sqrt((1 - beta2) / (1 + beta2)) = 0.071 of one probe's noise. A form is accepted for a
#: precision when its error (one probe, and the mean of the probes: a bias does not average out)
#: stays below that: below what the optimizer's own estimate carries anyway.
BETA2 = 0.99
ACCEPT = math.sqrt((1 - BETA2) / (1 + BETA2))


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32's 10 mantissa bits (round to nearest, ties away from zero)."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(t)


class TF32Emulation(TorchDispatchMode):
    """Round the float32 operands of matrix products and convolutions to TF32 (forward and backward)."""

    ROUNDED = {
        aten.mm.default: (0, 1),
        aten.bmm.default: (0, 1),
        aten.addmm.default: (1, 2),
        aten.baddbmm.default: (1, 2),
        aten.convolution.default: (0, 1),
        aten.convolution_backward.default: (0, 1, 2),
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        which = self.ROUNDED.get(func)
        if which:
            args = tuple(round_tf32(a) if i in which and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


class Regime:
    """How a pass at one training precision runs: a context, and parameters/inputs as the pass sees them."""

    def __init__(self, name: str):
        if name not in PRECISIONS:
            raise ValueError(f"Invalid precision: {name!r} (expected one of {', '.join(PRECISIONS)})")
        self.name = name

    def context(self):
        if self.name == "bf16_autocast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        if self.name == "fp16_autocast_scaled":
            return torch.autocast("cpu", dtype=torch.float16)
        if self.name == "tf32":
            return TF32Emulation()
        return contextlib.nullcontext()

    def backward_context(self):
        """Backward passes run outside autocast (in the dtypes its forward chose), TF32 applies to them."""
        return TF32Emulation() if self.name == "tf32" else contextlib.nullcontext()

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        if self.name == "fsdp2_bf16_params" and t.is_floating_point():
            return t.to(torch.bfloat16)
        return t

    @property
    def refresh(self) -> Regime:
        """Where the pre-recording refresh took ``g(theta + eps v)``: outside autocast, but under the
        global TF32 flags and FSDP2's policy."""
        return Regime("float32") if "autocast" in self.name else self


class Problem:
    """A model at fixed float32 weights, a batch, and the exact float64 quantities."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        self.name, self.model, self.x, self.y = name, model.float().eval(), x, y
        self.names = [n for n, _ in model.named_parameters()]
        self.theta = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.theta_norm = float(torch.cat([t.flatten() for t in self.theta.values()]).norm())
        self.sizes = [t.numel() for t in self.theta.values()]

    def loss(self, params: dict, regime: Regime | None = None) -> torch.Tensor:
        regime = regime or Regime("float32")
        x = regime.cast(self.x)
        with sdpa_kernel(SDPBackend.MATH), regime.context():
            out = functional_call(self.model, {n: regime.cast(p) for n, p in params.items()}, (x,))
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.y.reshape(-1))

    def grad(self, regime: Regime, params: dict | None = None) -> torch.Tensor:
        """The flat float32 gradient at ``params`` (default theta), taken at ``regime``'s precision."""
        params = self.theta if params is None else params
        leaves = {n: regime.cast(p).detach().requires_grad_() for n, p in params.items()}
        scale = 2.0**16 if regime.name == "fp16_autocast_scaled" else 1.0
        while True:  # fp16: halve the loss scale until the gradient is finite (as GradScaler does)
            loss = self.loss(leaves, regime)
            with regime.backward_context():
                gs = torch.autograd.grad(loss * scale, list(leaves.values()), allow_unused=True)
            g = (
                torch.cat([torch.zeros(s) if t is None else t.float().flatten() for t, s in zip(gs, self.sizes)])
                / scale
            )
            if torch.isfinite(g).all() or scale <= 1:
                return g
            scale /= 2

    def at(self, flat_step: torch.Tensor) -> dict:
        out, offset = {}, 0
        for n, t in self.theta.items():
            out[n] = t + flat_step[offset : offset + t.numel()].view_as(t)
            offset += t.numel()
        return out

    def autograd_hv(self, regime: Regime, v: torch.Tensor) -> torch.Tensor:
        leaves = {n: regime.cast(p).detach().requires_grad_() for n, p in self.theta.items()}
        loss = self.loss(leaves, regime)
        with regime.backward_context():
            gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            vs = [regime.cast(c).view_as(t) for c, t in zip(v.split(self.sizes), leaves.values())]
            hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=vs)
        return torch.cat([t.float().flatten() for t in hv])

    def exact(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """``v -> H v`` exactly (float64 forward-over-reverse) and the exact diagonal of ``H``."""
        theta64 = torch.cat([t.flatten() for t in self.theta.values()]).double()
        model64 = _float64_copy(self.model)
        x = self.x.double() if self.x.is_floating_point() else self.x

        def loss_of(flat):
            params, offset = {}, 0
            for n, s, t in zip(self.names, self.sizes, self.theta.values()):
                params[n] = flat[offset : offset + s].view(t.shape)
                offset += s
            with sdpa_kernel(SDPBackend.MATH):
                out = functional_call(model64, params, (x,))
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.y.reshape(-1))

        grad = torch.func.grad(loss_of)

        def hv(v):
            return torch.func.jvp(grad, (theta64,), (v.double(),))[1]

        basis = torch.eye(theta64.numel(), dtype=torch.float64)
        diag = torch.cat([(torch.func.vmap(hv)(chunk) * chunk).sum(1) for chunk in basis.split(256)])
        return hv, diag


def _float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (its float32 weights, exactly)."""
    import copy

    return copy.deepcopy(model).double()


def _mlp(seed: int) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 40), nn.GELU(), nn.LayerNorm(40), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 10)
    )
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    return _warm(Problem("mlp", model, x, y))


def _gpt(seed: int) -> Problem:
    torch.manual_seed(seed)
    model = GPT(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=12, dropout=0.0)
    x = torch.randint(0, 16, (8, 16))
    y = torch.roll(x, -1, 1)  # a learnable target: the next token of a cyclic sequence
    return _warm(Problem("gpt", model, x, y))


def _warm(problem: Problem, steps: int = 50) -> Problem:
    """A few AdamW steps so that the curvature is not that of the initialisation only."""
    opt = torch.optim.AdamW(problem.model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = problem.loss(dict(problem.model.named_parameters()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Problem(problem.name, problem.model, problem.x, problem.y)


PROBLEMS = {"mlp": _mlp, "gpt": _gpt}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(problem: Problem, precisions=PRECISIONS, probes: int = 16, seed: int = 0) -> dict:
    """Errors of every form at every precision on ``problem``; see the module docstring."""
    hv_exact, diag = problem.exact()
    gen = torch.Generator().manual_seed(seed)
    vs = [torch.randn(sum(problem.sizes), generator=gen) for _ in range(probes)]
    exact = [v.double() * hv_exact(v) for v in vs]
    noise = math.sqrt(statistics.fmean(_rel(d, diag) ** 2 for d in exact))
    mean_exact = torch.stack(exact).mean(0)
    out = {"model": problem.name, "n_params": sum(problem.sizes), "noise_1": noise, "probes": probes, "precisions": {}}
    for name in precisions:
        out["precisions"][name] = _measure_precision(problem, Regime(name), vs, exact, mean_exact)
    return out


def _measure_precision(problem: Problem, p: Regime, vs, exact, mean_exact) -> dict:
    f32 = Regime("float32")
    g0, g0_f32 = problem.grad(p), problem.grad(f32)

    def fd(v, c, regime_plus, g_base=None, central=False):
        eps = c * (1 + problem.theta_norm) / float(v.norm())
        g_plus = problem.grad(regime_plus, problem.at(eps * v))
        if central:
            return v * (g_plus - problem.grad(regime_plus, problem.at(-eps * v))) / (2 * eps)
        return v * (g_plus - g_base) / eps

    forms = {
        "fd_reuse": lambda v: fd(v, C_FLOAT32, p.refresh, g0),
        "fd_float32": lambda v: fd(v, C_FLOAT32, f32, g0_f32),
        "autograd_p": lambda v: v * problem.autograd_hv(p, v),
    }
    row = {form: _summary([fn(v) for v in vs], exact, mean_exact) for form, fn in forms.items()}
    for form, central in (("fd_forward_p", False), ("fd_central_p", True)):
        best = None
        for c in C_GRID:
            s = _summary([fd(v, c, p, g0, central) for v in vs], exact, mean_exact) | {"c": c}
            if best is None or s["err_k"] < best["err_k"]:
                best = s
        row[form] = best
    return row


def _summary(ds, exact, mean_exact) -> dict:
    return {
        "err_1": statistics.median(_rel(d, e) for d, e in zip(ds, exact)),
        "err_k": _rel(torch.stack([d.double() for d in ds]).mean(0), mean_exact),
    }


def verdicts(results: list[dict]) -> dict:
    """Per precision and form: accepted when every model's ``err_1`` and ``err_k`` stay below
    ``ACCEPT`` times that model's one-probe noise."""
    out = {}
    for name in results[0]["precisions"]:
        out[name] = {
            form: all(
                max(r["precisions"][name][form]["err_1"], r["precisions"][name][form]["err_k"]) < ACCEPT * r["noise_1"]
                for r in results
            )
            for form in FORMS
        }
    return out


LABELS = {
    "fd_reuse": "FD reusing the training g(θ) (before)",
    "fd_forward_p": "FD forward, both at P (best c)",
    "fd_central_p": "FD central, both at P (best c)",
    "fd_float32": "FD, both gradients float32 (TF32 off)",
    "autograd_p": "double backward at P",
}


def markdown(results: list[dict]) -> str:
    ok = verdicts(results)
    lines = [
        "Relative L2 error of `v * Hv` against the exact float64 product (median over one-probe estimates / "
        f"mean of {results[0]['probes']} probes), per model; ✓: below {ACCEPT:.3f} × the probe noise on every model "
        f"(the noise left after an EMA with beta2={BETA2}).",
        "",
        "Probe noise (one Gaussian probe, relative to diag H): "
        + ", ".join(f"{r['model']} ({r['n_params']} parameters) {r['noise_1']:.2f}" for r in results)
        + ".",
        "",
        "| precision P | " + " | ".join(LABELS[f] for f in FORMS) + " |",
        "|---|" + "---|" * len(FORMS),
    ]
    for name in results[0]["precisions"]:
        cells = []
        for form in FORMS:
            parts = []
            for r in results:
                s = r["precisions"][name][form]
                c = f", c={s['c']:g}" if "c" in s else ""
                parts.append(f"{r['model']} {s['err_1']:.2g} / {s['err_k']:.2g}{c}")
            cells.append(("✓ " if ok[name][form] else "✗ ") + "; ".join(parts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,gpt", help="comma-separated, of: " + ", ".join(PROBLEMS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [
        measure(PROBLEMS[m](args.seed), args.precisions.split(","), args.probes, args.seed)
        for m in args.models.split(",")
    ]
    md = markdown(results)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(
            json.dumps({"results": results, "accepted": verdicts(results)}, indent=1)
        )
        (args.out / "results.md").write_text(md)


if __name__ == "__main__":
    main()
