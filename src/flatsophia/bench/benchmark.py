#!/usr/bin/env python
"""Performance benchmark of the flatsophia optimizers against torch AdamW, sophia-opt and SOAP.

Everything runs in ONE process. Gradients are filled once (one forward + backward on a fixed batch)
and every candidate gets its own deep copy of the model with those exact gradients. Each section
warms its candidates up first (excluded from the numbers; the first call of a ``torch.compile``d
step is reported separately as its compile time), then measures them interleaved: ``--rounds``
rounds, each round timing every candidate once in a rotated order, so that slow drift of the machine
(other jobs, thermal state) hits all candidates alike. Timing uses ``torch.utils.benchmark.Timer``
(``blocked_autorange``; ``timeit(number=k)`` for the k-iteration training blocks) with
``num_threads=--threads``; the reported median / min / max / IQR are over all per-call samples of
all rounds. Ratios to fused AdamW are given twice: the ratio of the medians, and ``paired``, the
median over rounds of the ratio of the two round medians (candidates of one section share rounds,
so a drift of the machine between rounds cancels in each round's ratio).

Sections:

* ``step``: the optimizer step alone: eager; ``torch.compile`` of a function calling ``step()``
  (with ``capture_scalar_outputs=True`` and ``recompile_limit=64``; a compile failure, a timeout or a
  step that recompiles every call is reported in the table, not raised). SOAP samples are means
  of 10 consecutive steps (one eigenbasis refresh each).
* ``refresh``: the Hessian refresh alone (Hutchinson reverse-over-reverse HVP + ``update_hessian``
  for SophiaH / FlatSophia, the latter including its global top-k mask; sampled-label
  Gauss-Newton-Bartlett gradient + ``update_hessian`` for SophiaG and for the authors' SophiaG),
  plus ``update_hessian`` alone on a fixed estimate.
* ``hvp``: one Hessian-vector product (forward included), reverse-over-reverse
  (``torch.autograd.grad`` twice, as ``flatsophia.hessian.Hutchinson``) vs forward-over-reverse
  (``torch.func.jvp`` over ``torch.func.grad`` of a ``functional_call``).
* ``iteration``: a training iteration (zero_grad + forward + backward + step) amortised over
  ``--k`` iterations with one Hessian refresh per ``k`` (one Timer run = k consecutive
  iterations, which always contain exactly one refresh; for our SOAP, whose eigenbases refresh every
  10 steps, one eigenbasis refresh with the default k). Rows: eager step with the refresh on its
  own forward (the authors' loop); eager step with the refresh sharing the training forward
  (``refresh: fused``: the estimator's ``from_loss`` API, the code path of the training module:
  Hutchinson differentiates the training gradient once more, Gauss-Newton-Bartlett samples labels
  from the training logits and back-propagates the sampled-label loss through the same graph).
* ``state``: optimizer state bytes per parameter (``sum(t.nbytes for tensors in
  optimizer.state) / n_params``), reported excluding the 0-d ``step`` counter tensors (the
  headline, used by the targets) and including them.
* ``memory``: peak CPU tensor memory allocated during one refresh (and, for comparison, one
  forward + backward). Measured with ``torch.profiler`` (``profile_memory=True``): the maximum
  running sum of the allocator's allocation/free events during the call, i.e. bytes allocated by
  the call and not yet freed (frees of tensors that existed before it are not subtracted); on
  CUDA ``torch.cuda.max_memory_allocated`` is used instead. Not the process RSS.
* ``denormal``: a SophiaH step whose Hessian EMA has decayed into the float32 denormal range,
  with ``torch.set_flush_denormal(False)`` and ``(True)``.
* ``flops``: matrix-multiply FLOPs of the SOAP steps over one full cycle of
  ``precondition_frequency`` (10) steps, counted with ``torch.utils.flop_counter.FlopCounterMode``
  (``mm``/``addmm``/``bmm`` plus the in-place ``addmm_``; QR and ``eigh`` are not counted, both
  implementations run the same ones), next to the algorithm's floor computed from our factor shapes:
  per step 2·N·Σd to rotate the gradient into the eigenbasis, 2·N·Σd to rotate the update back and
  2·N·Σd to fold the gradient into the factors (N: elements of a tensor, Σd: sum of its factored
  dims); per refresh one power-iteration product (2·d³ per factor) and the first moment moved to
  the new bases (see ``soap_flop_floor``). SOAP is matmul-bound, so
  the FLOP ratio bounds the step-time ratio any faithful implementation can reach.

Models (``--model``, ``--size``); the default is ``--model vit --size base``:

* ``vit``: timm ``vit_small_patch16_224`` geometry scaled to CIFAR: ``img_size=32, patch_size=4,
  embed_dim=384, num_heads=6, depth=3, num_classes=100`` = 5,406,820 parameters (44 tensors)
  (``small``: embed 192, 3 heads, depth 3; ``tiny``: 16 px, embed 32, depth 1). Batch 32.
* ``mlp``: 3072-1024-1024-1024-100 GELU MLP with LayerNorms, 5.35M parameters. Batch 128.
* ``gpt``: a 6-layer causal transformer LM (d=256, 4 heads, vocab 2048, context 64, tied
  embeddings), 5.3M parameters. Batch 16 sequences (1024 tokens).
* ``experiment=<name>``: the model of a language-model experiment config, built from ``conf/``
  exactly as ``src/train.py`` builds it, with that experiment's batch and context (e.g.
  ``experiment=sophia_charlm``: the 0.84M-parameter GPT of the ``charlm`` study, 16x128 tokens).

Usage::

    python scripts/benchmark.py                       # full run (~15 min on 2 cores)
    python scripts/benchmark.py --smoke               # tiny model, seconds (used by the tests)
    python scripts/benchmark.py --json bench.json --threads 2 --model gpt
    python scripts/benchmark.py --device cuda --json bench_cuda.json   # GPU (Timer synchronises)

``main(argv)`` returns the results dict (the same numbers ``--json`` writes).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from flatsophia.hessian import GaussNewtonBartlett, Hutchinson
from flatsophia.hessian.base import math_attention
from flatsophia.optim import FlatSophia, SophiaG, SophiaH
from flatsophia.optim.factory import param_groups

# --------------------------------------------------------------------------------------- models

VIT_SIZES = {
    "tiny": dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10),
    "small": dict(img_size=32, patch_size=4, embed_dim=192, depth=3, num_heads=3, num_classes=100),
    "base": dict(img_size=32, patch_size=4, embed_dim=384, depth=3, num_heads=6, num_classes=100),
}
MLP_SIZES = {
    "tiny": dict(img_size=8, hidden=(32,), num_classes=10),
    "small": dict(img_size=32, hidden=(384, 384), num_classes=100),
    "base": dict(img_size=32, hidden=(1024, 1024, 1024), num_classes=100),
}
GPT_SIZES = {
    "tiny": dict(vocab=64, ctx=16, dim=32, depth=1, heads=2),
    "small": dict(vocab=1024, ctx=64, dim=128, depth=4, heads=4),
    "base": dict(vocab=2048, ctx=64, dim=256, depth=6, heads=4),
}
DEFAULT_BATCH = {
    ("vit", "tiny"): 8, ("vit", "small"): 32, ("vit", "base"): 32,
    ("mlp", "tiny"): 8, ("mlp", "small"): 128, ("mlp", "base"): 128,
    ("gpt", "tiny"): 4, ("gpt", "small"): 16, ("gpt", "base"): 16,
}


class MLP(nn.Module):
    def __init__(self, img_size: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = 3 * img_size * img_size
        for h in hidden:
            layers += [nn.Linear(d, h), nn.LayerNorm(h), nn.GELU()]
            d = h
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A minimal GPT-2-style causal LM (pre-norm blocks, tied embeddings)."""

    def __init__(self, vocab: int, ctx: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def build_model(kind: str, size: str, batch: int | None, seed: int):
    """Returns ``(model, inputs, targets, predictions_per_step, description)``."""
    torch.manual_seed(seed)
    if kind == "vit":
        import timm

        cfg = VIT_SIZES[size]
        model = timm.create_model("vit_small_patch16_224", pretrained=False, **cfg)
        b = batch or DEFAULT_BATCH[(kind, size)]
        x = torch.randn(b, 3, cfg["img_size"], cfg["img_size"])
        y = torch.randint(0, cfg["num_classes"], (b,))
        desc = "timm vit_small_patch16_224(" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + f"), batch {b}"
        preds = b
    elif kind == "mlp":
        cfg = MLP_SIZES[size]
        model = MLP(**cfg)
        b = batch or DEFAULT_BATCH[(kind, size)]
        x = torch.randn(b, 3, cfg["img_size"], cfg["img_size"])
        y = torch.randint(0, cfg["num_classes"], (b,))
        dims = [3 * cfg["img_size"] ** 2, *cfg["hidden"], cfg["num_classes"]]
        desc = "MLP " + "-".join(map(str, dims)) + f" (GELU, LayerNorm), batch {b}"
        preds = b
    elif kind == "gpt":
        cfg = GPT_SIZES[size]
        model = TinyGPT(**cfg)
        b = batch or DEFAULT_BATCH[(kind, size)]
        x = torch.randint(0, cfg["vocab"], (b, cfg["ctx"]))
        y = torch.randint(0, cfg["vocab"], (b, cfg["ctx"]))
        desc = "causal LM (" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + f"), batch {b}x{cfg['ctx']} tokens"
        preds = b * cfg["ctx"]
    elif kind.startswith("experiment="):
        return _experiment_model(kind.split("=", 1)[1], batch)
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(kind)
    return model, x, y.reshape(-1), preds, desc


def _experiment_model(name: str, batch: int | None):
    """The model of the project's language-model ``experiment=<name>`` (composed with Hydra and
    instantiated as ``src/train.py`` does) on random token ids shaped like its data batches."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from flatsophia.experiments.studies import project_root

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    model = instantiate(cfg.model)
    if cfg.data.get("kind") != "tokens":
        raise SystemExit(f"--model experiment={name}: only language-model experiments (token data, e.g. "
                         "sophia_charlm) are supported")
    b, t, v = batch or int(cfg.data.batch_size), int(cfg.data.input_shape[0]), int(cfg.data.num_classes)
    x, y = torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t))
    n = sum(p.numel() for p in model.parameters())
    desc = f"experiment={name}: {cfg.model._target_.rsplit('.', 1)[-1]} ({n:,} parameters), batch {b}x{t} tokens"
    return model, x, y.reshape(-1), b * t, desc


def closures(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """``forward()`` -> logits shaped (N, C); ``loss_fn(logits)`` -> mean cross-entropy."""

    def forward():
        out = model(x)
        return out.reshape(-1, out.shape[-1])

    def loss_fn(logits):
        return F.cross_entropy(logits, y)

    return forward, loss_fn


# ----------------------------------------------------------------------------------- optimizers


def _authors_sophia():
    try:
        from sophia_opt import SophiaG as AuthorsSophiaG  # the sophia-opt wheel's module name
    except ImportError:
        try:
            from sophia import SophiaG as AuthorsSophiaG
        except ImportError:
            return None
    return AuthorsSophiaG


def _our_soap():
    try:
        from flatsophia.optim.soap import SOAP
    except Exception as e:  # noqa: BLE001 - a half-written module may raise anything
        return None, f"flatsophia.optim.soap unavailable ({type(e).__name__}: {e})"
    return SOAP, None


def _po_soap():
    try:
        from pytorch_optimizer import SOAP
    except Exception as e:  # noqa: BLE001
        return None, f"pytorch_optimizer.SOAP unavailable ({type(e).__name__}: {e})"
    return SOAP, None


# name -> (label, kind) ; kind selects the refresh (None / "gnb" / "hutchinson" / "authors_gnb")
OPTIMIZERS = {
    "adamw_fused": ("torch AdamW (fused=True)", None),
    "adamw": ("torch AdamW (default)", None),
    "sophia_opt": ("sophia-opt SophiaG (authors)", "authors_gnb"),
    "po_soap": ("pytorch_optimizer SOAP", None),
    "sophia_g": ("ours SophiaG", "gnb"),
    "sophia_h": ("ours SophiaH", "hutchinson"),
    "flat_sophia": ("ours FlatSophia", "hutchinson"),
    "soap": ("ours SOAP", None),
}
SOPHIA_FAMILY = ("sophia_g", "sophia_h", "flat_sophia")
#: how the step variants are shown: ``compiled`` = torch.compile of the step function from the
#: outside; ``loop`` = our eager step with ``foreach=False`` (on CUDA only, where the default eager
#: step is multi-tensor)
PATH_NAMES = {
    "eager": "eager",
    "loop": "eager, foreach=False",
    "compiled": "torch.compile(step)",
}
EAGER_PATHS = ("eager", "loop")


def make_optimizer(name: str, model: nn.Module, foreach: bool | None = None):
    """The optimizer ``name`` over ``model``'s parameter groups, or raises ``_Unavailable``.

    ``foreach`` is passed to our Sophia-family optimizers when it is not ``None``."""
    groups = param_groups(model)
    kw = {}
    if foreach is not None and name in SOPHIA_FAMILY:
        kw["foreach"] = foreach
    if name == "adamw_fused":
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=True)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    elif name == "sophia_opt":
        cls = _authors_sophia()
        if cls is None:
            raise _Unavailable("sophia-opt is not installed")
        opt = cls(groups, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    elif name == "sophia_g":
        opt = SophiaG(groups, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1, **kw)
    elif name == "sophia_h":
        opt = SophiaH(groups, **kw)
    elif name == "flat_sophia":
        opt = FlatSophia(groups, **kw)
    elif name == "soap":
        cls, why = _our_soap()
        if cls is None:
            raise _Unavailable(why)
        opt = cls(groups, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10, **kw)
    elif name == "po_soap":
        cls, why = _po_soap()
        if cls is None:
            raise _Unavailable(why)
        opt = cls(groups, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)
    else:  # pragma: no cover
        raise ValueError(name)
    return opt


class _Unavailable(Exception):
    pass


def step_fn_for(name: str, opt, preds: int) -> Callable[[], None]:
    if name in ("sophia_g", "sophia_opt"):
        return lambda: opt.step(bs=preds)
    return lambda: opt.step()


# ------------------------------------------------------------------------------------- helpers


def stats_of(times: list[float]) -> dict:
    """Median / min / max / IQR in milliseconds of per-call times (seconds)."""
    ts = sorted(times)
    n = len(ts)
    if n == 0:
        return dict(median_ms=None, min_ms=None, max_ms=None, iqr_ms=None, n=0)
    if n >= 4:
        q = statistics.quantiles(ts, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = ts[-1] - ts[0]
    return dict(
        median_ms=statistics.median(ts) * 1e3, min_ms=ts[0] * 1e3, max_ms=ts[-1] * 1e3, iqr_ms=iqr * 1e3, n=n
    )


def copy_grads(dst: nn.Module, grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(dst.parameters(), grads):
        p.grad = None if g is None else g.clone()


def state_bytes(opt) -> tuple[int, int]:
    """(bytes excluding 0-d tensors, bytes of all tensors) held in ``opt.state``."""
    excl = total = 0
    seen: set[int] = set()

    def visit(v):
        nonlocal excl, total
        if isinstance(v, torch.Tensor):
            key = id(v)
            if key in seen:
                return
            seen.add(key)
            nb = v.numel() * v.element_size()
            total += nb
            if v.dim() > 0:
                excl += nb
        elif isinstance(v, dict):
            for w in v.values():
                visit(w)
        elif isinstance(v, (list, tuple)):
            for w in v:
                visit(w)

    for s in opt.state.values():
        visit(s)
    return excl, total


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (no-op where unsupported)."""
    usable = seconds and seconds > 0 and hasattr(signal, "SIGALRM")
    try:
        import threading

        usable = usable and threading.current_thread() is threading.main_thread()
    except Exception:  # noqa: BLE001
        usable = False
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise TimeoutError(f"torch.compile did not finish within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _short_error(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause (inductor wraps the real error)."""
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    root = chain[-1]
    first = next((m.strip() for m in str(root).splitlines() if m.strip()), "")
    wrap = f" (via {type(e).__name__})" if root is not e else ""
    return f"{type(root).__name__}: {first[:200]}{wrap}".replace("|", "/")


def dynamo_counts() -> tuple[int, int]:
    """(frames dynamo has tried to convert, graph breaks) so far in this process."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["frames"].get("total", 0)), int(sum(counters["graph_break"].values()))
    except Exception:  # noqa: BLE001
        return 0, 0


@contextlib.contextmanager
def dynamo_config(enabled: bool):
    """Settings for the compiled steps, restored afterwards.

    * ``capture_scalar_outputs=True``: ``Tensor.item()`` (SophiaH's bias correction reads the step
      counter) is traced instead of breaking the graph once per parameter.
    * ``recompile_limit=64``: SOAP-like steps legitimately compile a few variants.
    """
    if not enabled:
        yield
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    saved = {}
    for key, val in (("capture_scalar_outputs", True), ("recompile_limit", 64), ("cache_size_limit", 64)):
        if hasattr(cfg, key):
            saved[key] = getattr(cfg, key)
            setattr(cfg, key, val)
    try:
        yield
    finally:
        for key, val in saved.items():
            setattr(cfg, key, val)


class _NotSteady(Exception):
    pass


def guard_failure_snapshot() -> dict:
    try:
        from torch._dynamo.utils import guard_failures

        return {k: len(v) for k, v in guard_failures.items()}
    except Exception:  # noqa: BLE001
        return {}


def new_guard_failure(before: dict) -> str | None:
    """The newest dynamo guard-failure reason recorded since ``before`` (a snapshot)."""
    try:
        from torch._dynamo.utils import guard_failures

        for k, v in guard_failures.items():
            if len(v) > before.get(k, 0):
                msg = " ".join(str(v[-1]).split()).split(" User stack trace")[0]
                return msg[:200].replace("|", "/")
    except Exception:  # noqa: BLE001
        pass
    return None


def unique_function(fn: Callable, name: str) -> Callable:
    """``fn`` with its own code object: torch.compile caches (and counts recompiles) per code object,
    so candidates built from one lambda would otherwise share one cache and hit its limit."""
    import types

    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def measure_interleaved(
    cands: dict[str, Callable[[], object]],
    rounds: int,
    min_run_time: float,
    threads: int,
    label: str,
    number: int | dict[str, int] | None = None,
    log: Callable[[str], None] = print,
    rounds_of: dict[str, int] | None = None,
    per_round: dict[str, list[float | None]] | None = None,
) -> dict[str, list[float]]:
    """Per-call times (s) of every candidate, measured in ``rounds`` rotated rounds.

    ``number=None`` (or no entry for a candidate): ``Timer.blocked_autorange(min_run_time)`` per
    candidate and round (its ``times`` are per-call averages of each block). ``number=k``:
    ``Timer.timeit(number=k)`` (one sample per round: the mean of k consecutive calls, after the
    Timer's own 2-call warm-up). ``rounds_of[name]`` caps the rounds of expensive candidates.
    ``per_round`` (optional) receives each candidate's median of each round (``None`` for a
    skipped round), for ratios paired round by round (:func:`paired_ratio`).
    """
    names = list(cands)
    if not isinstance(number, dict):
        number = {n: number for n in names}
    rounds_of = rounds_of or {}
    timers = {
        n: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=label, sub_label=n)
        for n, fn in cands.items()
    }
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for n in order:
            if r >= rounds_of.get(n, rounds):
                continue
            if number.get(n) is None:
                m = timers[n].blocked_autorange(min_run_time=min_run_time)
            else:
                m = timers[n].timeit(number=number[n])
            out[n].extend(m.times)
            if per_round is not None:
                per_round.setdefault(n, [None] * rounds)[r] = statistics.median(m.times)
        log(f"  [{label}] round {r + 1}/{rounds} done")
    return out


def peak_memory(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Peak bytes of tensor memory allocated while ``fn`` runs, above the level at its start."""
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        del out
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    allocs: list[tuple[int, int]] = []

    def walk(node):
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for c in node.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocs.sort()
    cur = peak = 0
    for _, a in allocs:
        cur += a
        peak = max(peak, cur)
    return int(peak)


# ------------------------------------------------------------------------------------ the runs


def matmul_flops(fn: Callable[[], object], calls: int) -> int:
    """Matrix-multiply FLOPs of ``calls`` calls of ``fn`` (``FlopCounterMode``, plus in-place ``addmm_``)."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as counter:
        for _ in range(calls):
            fn()
    return counter.get_total_flops()


def soap_flop_floor(opt) -> float:
    """Matmul FLOPs per step that SOAP's update needs, from our SOAP's factor shapes (amortised refresh).

    Per tensor with N elements and factored dims d_k, every step: rotate the gradient in (2·N·d_k
    per dim), the update back (2·N·d_k) and fold the gradient into each factor (2·N·d_k). Every
    ``precondition_frequency`` steps: one power-iteration product L_k Q_k (2·d_k³) per factor, and
    the first moment re-expressed in the new bases, the cheaper of rotating it back and forward
    (4·N·Σd) or composing old and new bases first (Σ 2·d_k³ + 2·N·Σd).
    """
    total = 0.0
    freq = {id(p): g["precondition_frequency"] for g in opt.param_groups for p in g["params"]}
    for p, st in opt.state.items():
        dims = [m.shape[0] for m in st.get("GG", ()) if m is not None]
        if not dims:
            continue
        n, sd, cubes = st["exp_avg"].numel(), sum(dims), 2 * sum(d**3 for d in dims)
        total += 6 * n * sd + (cubes + min(4 * n * sd, cubes + 2 * n * sd)) / freq[id(p)]
    return total


class Bench:
    def __init__(self, args):
        self.args = args
        t0 = time.perf_counter()
        self.log = (
            (lambda *a: None)
            if args.quiet
            else (lambda *a: print(f"[{time.perf_counter() - t0:7.1f} s]", *a, flush=True))
        )
        self.device = torch.device(args.device)
        self.model, self.x, self.y, self.preds, self.model_desc = build_model(
            args.model, args.size, args.batch, args.seed
        )
        self.model.to(self.device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.n_tensors = sum(1 for p in self.model.parameters() if p.requires_grad)
        fwd, loss_fn = closures(self.model, self.x, self.y)
        self.model.zero_grad(set_to_none=True)
        loss_fn(fwd()).backward()
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.model.parameters()]
        # One estimate of each kind on the base model, used to prime the optimizers' states.
        hparams = [p for g in param_groups(self.model) for p in g["params"]]
        self.est_hutch = [None if e is None else e.detach() for e in Hutchinson(seed=args.seed)(fwd, loss_fn, hparams)]
        self.est_gnb = [
            None if e is None else e.detach() for e in GaussNewtonBartlett(seed=args.seed)(fwd, None, hparams)
        ]
        self.model.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- candidates
    def fresh(self, name: str, foreach: bool | None = None):
        """A model copy with the benchmark gradients and a primed optimizer: ``(model, opt, step_fn)``."""
        model = copy.deepcopy(self.model)
        opt = make_optimizer(name, model, foreach)
        kind = OPTIMIZERS[name][1]
        if kind == "hutchinson":
            opt.update_hessian(self.est_hutch)
        elif kind == "gnb":
            opt.update_hessian(self.est_gnb)
        elif kind == "authors_gnb":
            hparams = [p for g in opt.param_groups for p in g["params"]]
            for p, e in zip(hparams, self.est_gnb):
                p.grad = None if e is None else e.clone()
            opt.update_hessian()
        copy_grads(model, self.grads)
        return model, opt, step_fn_for(name, opt, self.preds)

    def refresh_fn(self, name: str, model: nn.Module, opt) -> Callable[[], object] | None:
        """The Hessian refresh for optimizer ``name`` on ``model``, or ``None`` for first-order ones."""
        kind = OPTIMIZERS[name][1]
        fwd, loss_fn = closures(model, self.x, self.y)
        if kind is None:
            return None
        if kind == "hutchinson":
            est = Hutchinson(seed=self.args.seed + 1)

            def refresh():
                opt.update_hessian(est(fwd, loss_fn, opt.hessian_params()))

        elif kind == "gnb":
            est = GaussNewtonBartlett(seed=self.args.seed + 1)

            def refresh():
                opt.update_hessian(est(fwd, None, opt.hessian_params()))

        else:  # the authors' loop: sampled-label loss back-propagated into p.grad, then update_hessian()
            gen = torch.Generator().manual_seed(self.args.seed + 1)

            def refresh():
                logits = fwd()
                with torch.no_grad():
                    yhat = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen).squeeze(-1)
                loss = F.cross_entropy(logits, yhat)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.update_hessian()
                opt.zero_grad(set_to_none=True)

        return refresh

    # -------------------------------------------------------------- sections
    def run_step(self, res):
        a = self.args
        self.log("== step: optimizer step alone")
        rows: dict[str, dict[str, dict]] = {}
        cands: dict[str, Callable] = {}
        reps: dict[str, int] = {}
        keep = []  # keep models/optimizers alive while timing
        with dynamo_config(a.compile):
            for name in a.optimizers:
                rows[name] = {}
                # SOAP refreshes its eigenbases every 10 steps: one sample = the mean of 10
                # consecutive steps (Timer.timeit(number=10)), so the median is the amortised cost.
                n_rep = 10 if name in ("soap", "po_soap") else 1
                cuda_sophia = self.device.type == "cuda" and name in SOPHIA_FAMILY
                variants = ["eager"] + (["loop"] if cuda_sophia else []) + ["compiled"]
                variants = [v for v in variants if v in a.paths]
                for variant in variants:
                    row = dict(label=OPTIMIZERS[name][0], variant=variant, status="ok", note="", compile_s=None)
                    if n_rep > 1:
                        row["note"] = f"1 sample = mean of {n_rep} steps (1 eigenbasis refresh)"
                    rows[name][variant] = row
                    if variant not in EAGER_PATHS and not a.compile:
                        row.update(status="skipped", note="compile off (--no-compile / --smoke)")
                        continue
                    try:
                        model, opt, fn = self.fresh(name, foreach=False if variant == "loop" else None)
                    except _Unavailable as e:
                        row.update(status="skipped", note=str(e))
                        continue
                    if variant == "compiled":
                        c0 = dynamo_counts()
                        try:
                            cfn = torch.compile(unique_function(fn, f"{name}_step"))
                            t0 = time.perf_counter()
                            with alarm(a.compile_timeout), warnings.catch_warnings():
                                warnings.simplefilter("ignore")
                                cfn()  # first call: state init + compile
                                t1 = time.perf_counter()
                                # Steady-state graph(s): one full SOAP cycle. Give up when three
                                # calls in a row recompile (e.g. guards on a Python-int step).
                                streak = 0
                                for _ in range(11):
                                    g0, n0 = guard_failure_snapshot(), dynamo_counts()[0]
                                    cfn()
                                    streak = streak + 1 if dynamo_counts()[0] > n0 else 0
                                    if streak >= 3:
                                        raise _NotSteady(
                                            "recompiles on every step; last guard failure: "
                                            + (new_guard_failure(g0) or "?")
                                        )
                            row["compile_s"] = round(t1 - t0, 2)
                            row["warmup_s"] = round(time.perf_counter() - t0, 2)
                            c1 = dynamo_counts()
                            row["graph_breaks_in_warmup"] = c1[1] - c0[1]
                            row["_counts_before_timing"] = c1
                            fn = cfn
                        except _NotSteady as e:
                            row.update(status="failed", note=f"compiled, but {e}")
                            self.log(f"  {name}: compiled, but {e}")
                            continue
                        except Exception as e:  # noqa: BLE001 - report, don't crash
                            row.update(status="failed", note=f"compile failed: {_short_error(e)}")
                            self.log(f"  {name} compile failed: {_short_error(e)}")
                            if a.verbose:
                                traceback.print_exc()
                            continue
                        if row["graph_breaks_in_warmup"]:
                            row["note"] = _join(row["note"], f"{row['graph_breaks_in_warmup']} graph break(s)")
                        self.log(f"  {name}: compiled in {row['compile_s']} s (warm-up {row['warmup_s']} s)")
                    else:
                        for _ in range(3):
                            fn()
                    cands[f"{name}/{variant}"] = fn
                    reps[f"{name}/{variant}"] = n_rep
                    keep.append((model, opt, fn))
                    row["_opt"] = opt
            per_round: dict[str, list[float | None]] = {}
            times = measure_interleaved(
                cands, a.rounds, a.min_run_time, a.threads, "step", log=self.log,
                number={k: (n if n > 1 else None) for k, n in reps.items()},
                rounds_of={k: a.soap_rounds for k, n in reps.items() if n > 1},
                per_round=per_round,
            )
            # Steady state? Ten more calls of each compiled step must not make dynamo convert frames.
            for key, fn in cands.items():
                name, variant = key.split("/")
                if variant in EAGER_PATHS:
                    continue
                row = rows[name][variant]
                row.pop("_counts_before_timing", None)
                c0 = dynamo_counts()[0]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(10):
                        fn()
                extra = dynamo_counts()[0] - c0
                row["recompiles_per_10_steps"] = extra
                if extra:
                    row["note"] = _join(row["note"], f"NOT steady: dynamo re-entered {extra}x per 10 steps")
        for key, ts in times.items():
            name, variant = key.split("/")
            rows[name][variant].update(stats_of(ts), round_medians_ms=_ms_list(per_round.get(key)))
        # State bytes (every optimizer has now stepped >= 3 + timing times).
        state = {}
        for name in a.optimizers:
            row = rows[name]["eager"]
            opt = row.pop("_opt", None)
            for other in rows[name].values():
                other.pop("_opt", None)
            if opt is None:
                continue
            excl, total = state_bytes(opt)
            state[name] = dict(
                label=OPTIMIZERS[name][0],
                bytes_per_param=excl / self.n_params,
                bytes_per_param_incl_scalars=total / self.n_params,
                state_bytes=excl,
                state_bytes_incl_scalars=total,
            )
        del keep, cands
        gc.collect()
        res["step"] = rows
        res["state"] = state

    def run_refresh_and_hvp(self, res):
        a = self.args
        self.log("== refresh: Hessian refresh alone; hvp: reverse-over-reverse vs forward-over-reverse")
        rows: dict[str, dict] = {}
        cands: dict[str, Callable] = {}
        keep = []
        names = [n for n in a.optimizers if OPTIMIZERS[n][1] is not None]
        for name in names:
            row = dict(label=OPTIMIZERS[name][0] + " refresh", status="ok", note="")
            rows[name] = row
            try:
                model, opt, _ = self.fresh(name)
            except _Unavailable as e:
                row.update(status="skipped", note=str(e))
                continue
            fn = self.refresh_fn(name, model, opt)
            fn()
            cands[f"refresh/{name}"] = fn
            keep.append((model, opt))
            if OPTIMIZERS[name][1] in ("hutchinson", "gnb"):
                est = self.est_hutch if OPTIMIZERS[name][1] == "hutchinson" else self.est_gnb
                rows[name + "/update_hessian"] = dict(
                    label=OPTIMIZERS[name][0] + " update_hessian only", status="ok", note="fixed estimate"
                )

                def upd(opt=opt, est=est):
                    opt.update_hessian(est)

                upd()
                cands[f"refresh/{name}/update_hessian"] = upd
        notes = {
            "sophia_g": "GNB: forward + sampled-label backward + update_hessian",
            "sophia_opt": "authors' loop: forward + sampled-label loss.backward() + update_hessian()",
            "sophia_h": "Hutchinson (1 Gaussian probe, rev-over-rev) + update_hessian",
            "flat_sophia": "Hutchinson + update_hessian incl. global top-k mask (kthvalue)",
        }
        for n, r in rows.items():
            if n in notes and r["status"] == "ok":
                r["note"] = notes[n]

        # Hessian-vector products on the base model (fixed probes).
        hv_rows: dict[str, dict] = {}
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        names_p = [n for n, p in model.named_parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(a.seed)
        vs = [torch.randn(p.shape, generator=gen).to(p.device) for p in params]
        fwd, loss_fn = closures(model, self.x, self.y)

        def hvp_rev():
            with torch.enable_grad(), math_attention():
                loss = loss_fn(fwd())
                g = torch.autograd.grad(loss, params, create_graph=True)
                return torch.autograd.grad(g, params, grad_outputs=vs)

        pdict = {n: p.detach() for n, p in zip(names_p, params)}
        vdict = dict(zip(names_p, vs))

        def f(pd):
            out = torch.func.functional_call(model, pd, (self.x,))
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.y)

        gradf = torch.func.grad(f)

        def hvp_fwd():
            with math_attention():
                _, hv = torch.func.jvp(gradf, (pdict,), (vdict,))
            return hv

        hv_rows["rev_over_rev"] = dict(
            label="HVP reverse-over-reverse (autograd.grad x2)", status="ok", note="= flatsophia.hessian.Hutchinson"
        )
        hv_rows["fwd_over_rev"] = dict(
            label="HVP forward-over-reverse (func.jvp(func.grad))", status="ok", note=""
        )
        try:
            h1 = hvp_rev()
            h2 = hvp_fwd()
            h2 = [h2[n] for n in names_p]
            num = max(float((x - y).abs().max()) for x, y in zip(h1, h2))
            den = max(float(x.abs().max()) for x in h1) or 1.0
            hv_rows["fwd_over_rev"]["note"] = f"max |diff| vs rev-over-rev = {num / den:.1e} x max|Hv|"
            cands["hvp/rev_over_rev"] = hvp_rev
            cands["hvp/fwd_over_rev"] = hvp_fwd
            del h1, h2
        except Exception as e:  # noqa: BLE001
            hv_rows["fwd_over_rev"].update(status="failed", note=_short_error(e))
            cands["hvp/rev_over_rev"] = hvp_rev
        times = measure_interleaved(cands, a.rounds, a.min_run_time_heavy, a.threads, "refresh+hvp", log=self.log)
        for key, ts in times.items():
            _, rest = key.split("/", 1)
            (hv_rows if key.startswith("hvp/") else rows)[rest].update(stats_of(ts))
        r, fw = hv_rows["rev_over_rev"], hv_rows["fwd_over_rev"]
        if r.get("median_ms") and fw.get("median_ms"):
            faster = "fwd_over_rev" if fw["median_ms"] < r["median_ms"] else "rev_over_rev"
            hv_rows["faster"] = faster
            hv_rows["fwd_over_rev_vs_rev_over_rev"] = fw["median_ms"] / r["median_ms"]
        del keep, cands
        gc.collect()
        res["refresh"] = rows
        res["hvp"] = hv_rows

    def fused_refresh_iteration(self, name: str, model: nn.Module, opt) -> Callable[[], None]:
        """The training module's refresh iteration: ONE forward whose graph gives both the training
        gradient and the Hessian estimate, through the estimator's ``from_loss`` API (the code path
        of ``OptimLitModule._backward_with_refresh``)."""
        kind = OPTIMIZERS[name][1]
        cls = Hutchinson if kind == "hutchinson" else GaussNewtonBartlett
        est = cls(seed=self.args.seed + 1)
        fwd, loss_fn = closures(model, self.x, self.y)
        params = opt.hessian_params()

        def refresh_iteration():
            opt.zero_grad(set_to_none=True)
            with math_attention(getattr(est, "math_sdpa", False)):
                logits = fwd()
                loss = loss_fn(logits)
                grads, estimates = est.from_loss(loss, params, logits=logits)
            for p, g in zip(params, grads):
                p.grad = g
            opt.update_hessian(estimates)

        return refresh_iteration

    def run_iteration(self, res):
        a = self.args
        k = a.k
        self.log(f"== iteration: forward+backward+step, one refresh per {k} iterations")
        rows: dict[str, dict] = {}
        cands: dict[str, Callable] = {}
        keep = []
        # (name, refresh sharing the training forward)
        entries = [(n, False) for n in a.iter_optimizers]
        entries += [(n, True) for n in a.iter_optimizers if n in SOPHIA_FAMILY]
        for name, fused in entries:
            key = name + ("+fused" if fused else "")
            row = dict(label=OPTIMIZERS[name][0], status="ok", note="", k=k,
                       step_path=PATH_NAMES["eager"], refresh="fused" if fused else "separate")
            rows[key] = row
            try:
                model, opt, step = self.fresh(name)
            except _Unavailable as e:
                row.update(status="skipped", note=str(e))
                continue
            refresh = self.refresh_fn(name, model, opt)
            fwd, loss_fn = closures(model, self.x, self.y)
            counter = [0]
            if fused:
                refresh_it = self.fused_refresh_iteration(name, model, opt)

                def it(opt=opt, step=step, refresh_it=refresh_it, fwd=fwd, loss_fn=loss_fn, counter=counter):
                    if counter[0] % k == 0:
                        refresh_it()  # training gradient + estimate from one forward
                    else:
                        opt.zero_grad(set_to_none=True)
                        loss_fn(fwd()).backward()
                    counter[0] += 1
                    step()

            else:

                def it(opt=opt, step=step, refresh=refresh, fwd=fwd, loss_fn=loss_fn, counter=counter):
                    if refresh is not None and counter[0] % k == 0:
                        refresh()
                    counter[0] += 1
                    opt.zero_grad(set_to_none=True)
                    loss_fn(fwd()).backward()
                    step()

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(2):
                    it()
            if name == "soap":
                row["note"] = "eigenbasis refresh every 10 steps inside step()"
            elif refresh is None:
                row["note"] = "no refresh"
            elif fused:
                row["note"] = f"refresh every {k}, sharing the training forward (estimator.from_loss, as the module)"
            else:
                row["note"] = f"refresh every {k}, separate forward (authors' loop)"
            cands[key] = it
            keep.append((model, opt))
        # timeit(number=k): k consecutive calls hold exactly one refresh whatever the phase.
        per_round: dict[str, list[float | None]] = {}
        times = measure_interleaved(
            cands, a.rounds, 0.0, a.threads, "iteration", number=k, log=self.log, per_round=per_round
        )
        for key, ts in times.items():
            rows[key].update(stats_of(ts), round_medians_ms=_ms_list(per_round.get(key)))
        del keep, cands
        gc.collect()
        res["iteration"] = rows

    def run_memory(self, res):
        self.log("== memory: peak tensor memory of one refresh (torch.profiler allocation events)")
        rows = {}
        model, opt, _ = self.fresh("adamw_fused")
        fwd, loss_fn = closures(model, self.x, self.y)

        def fb():
            opt.zero_grad(set_to_none=True)
            loss_fn(fwd()).backward()

        fb()
        rows["fwd_bwd"] = dict(label="forward + backward (reference)", peak_bytes=peak_memory(fb, self.device))
        for name in [n for n in self.args.optimizers if OPTIMIZERS[n][1] is not None]:
            try:
                model, opt, _ = self.fresh(name)
            except _Unavailable:
                continue
            fn = self.refresh_fn(name, model, opt)
            fn()
            rows[name] = dict(label=OPTIMIZERS[name][0] + " refresh", peak_bytes=peak_memory(fn, self.device))
        for r in rows.values():
            r["peak_mib"] = r["peak_bytes"] / 2**20
            r["peak_bytes_per_param"] = r["peak_bytes"] / self.n_params
        res["memory"] = dict(
            method=(
                "cuda max_memory_allocated delta"
                if self.device.type == "cuda"
                else "torch.profiler(profile_memory=True): max running sum of the CPU allocator's "
                "allocation/free events during the call, i.e. peak bytes allocated by the call and not yet "
                "freed (frees of tensors that existed before it are not subtracted; not the process RSS)"
            ),
            rows=rows,
        )
        gc.collect()

    def run_denormal(self, res):
        a = self.args
        self.log("== denormal: SophiaH step with a Hessian EMA in the denormal range")
        if self.device.type != "cpu":
            note = "CPU only (set_flush_denormal sets the CPU's FTZ/DAZ bits)"
            res["denormal"] = {
                "ftz_off": dict(label="SophiaH step, denormal Hessian, set_flush_denormal(False)", status="skipped",
                                note=note),
                "ftz_on": dict(label="SophiaH step, denormal Hessian, set_flush_denormal(True)", status="skipped",
                               note=note),
            }
            return
        model, opt, fn = self.fresh("sophia_h")
        n_den = 0
        for st in opt.state.values():
            # ~ b2^t decay of an estimate that stopped reaching the parameter: float32 denormals.
            st["hessian"].fill_(1e-39)
            n_den += st["hessian"].numel()
        supported = torch.set_flush_denormal(False)
        for _ in range(3):
            fn()
        rows = {
            "ftz_off": dict(label="SophiaH step, denormal Hessian, set_flush_denormal(False)", status="ok", note=""),
            "ftz_on": dict(label="SophiaH step, denormal Hessian, set_flush_denormal(True)", status="ok", note=""),
        }
        if not supported:
            rows["ftz_on"].update(status="skipped", note="set_flush_denormal unsupported on this CPU")
        times: dict[str, list[float]] = {"ftz_off": [], "ftz_on": []}
        try:
            for r in range(a.rounds):
                for flag in ((False, True) if r % 2 == 0 else (True, False)):
                    if flag and not supported:
                        continue
                    torch.set_flush_denormal(flag)
                    key = "ftz_on" if flag else "ftz_off"
                    t = Timer(stmt="fn()", globals={"fn": fn}, num_threads=a.threads)
                    times[key].extend(t.blocked_autorange(min_run_time=a.min_run_time).times)
        finally:
            torch.set_flush_denormal(False)
        for key, ts in times.items():
            rows[key].update(stats_of(ts))
        if rows["ftz_on"].get("median_ms") and rows["ftz_off"].get("median_ms"):
            rows["ftz_on_vs_off"] = rows["ftz_on"]["median_ms"] / rows["ftz_off"]["median_ms"]
        rows["denormal_fraction_of_hessian"] = n_den / self.n_params
        res["denormal"] = rows


    def run_flops(self, res):
        """Matmul FLOPs per SOAP step (one refresh cycle), ours vs pytorch_optimizer, and the floor."""
        self.log("== flops: matrix-multiply FLOPs of the SOAP steps")
        rows: dict[str, dict] = {}
        cycle = 10
        for name in ("soap", "po_soap"):
            if name not in self.args.optimizers:
                continue
            row = rows[name] = dict(label=OPTIMIZERS[name][0], status="ok", note="")
            try:
                _, opt, fn = self.fresh(name)
            except _Unavailable as e:
                row.update(status="skipped", note=str(e))
                continue
            fn()  # the first call only builds the preconditioner
            flops = matmul_flops(fn, cycle)
            row.update(gflop_per_step=flops / cycle / 1e9, steps=cycle)
            if name == "soap":
                row["floor_gflop_per_step"] = soap_flop_floor(opt) / 1e9
        ours, theirs = rows.get("soap", {}), rows.get("po_soap", {})
        if ours.get("status") == "ok" and theirs.get("status") == "ok":
            rows["ours_vs_theirs"] = ours["gflop_per_step"] / theirs["gflop_per_step"]
            rows["floor_vs_theirs"] = ours["floor_gflop_per_step"] / theirs["gflop_per_step"]
        res["flops"] = rows


# --------------------------------------------------------------------------- ratios and targets


def _med(row) -> float | None:
    if not row or row.get("status") != "ok":
        return None
    return row.get("median_ms")


def _ratio(a, b) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _ms_list(seconds: list[float | None] | None) -> list[float | None] | None:
    return None if seconds is None else [None if t is None else t * 1e3 for t in seconds]


def paired_ratio(row, base) -> float | None:
    """Median over rounds of ``row``'s round median / ``base``'s in the same round.

    Candidates of one section are timed in the same interleaved rounds, so a slow drift of the
    machine (another tenant, clocks) hits both sides of each round's ratio alike; this is less
    sensitive to it than the ratio of the overall medians. ``None`` without common rounds.
    """
    ratios = _round_ratios(row, base)
    return statistics.median(ratios) if ratios else None


def _round_ratios(row, base) -> list[float]:
    a, b = (row or {}).get("round_medians_ms"), (base or {}).get("round_medians_ms")
    if not a or not b:
        return []
    return [x / y for x, y in zip(a, b) if x is not None and y is not None and y > 0]


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """Distribution-free confidence interval of the median: ``(lo, hi, coverage)``.

    With the values sorted, ``[v[j], v[n-1-j]]`` covers the population median with probability
    ``1 - 2 * P(Binomial(n, 1/2) <= j)``; ``j`` is the largest rank for which that is at least
    ``level`` (the coverage returned is that exact probability, >= ``level``). ``None`` when even
    ``[min, max]`` falls short of ``level`` (fewer than 6 values at 95 %).
    """
    n = len(values)
    if n == 0:
        return None
    v = sorted(values)
    tail, j = 0.0, -1  # tail = P(B <= j)
    while True:
        nxt = tail + math.comb(n, j + 1) / 2**n
        if 1 - 2 * nxt < level:
            break
        tail, j = nxt, j + 1
    if j < 0:
        return None
    return v[j], v[n - 1 - j], 1 - 2 * tail


def paired_ratio_ci(row, base, level: float = 0.95) -> tuple[float, float, float] | None:
    """:func:`median_ci` of the per-round ratios behind :func:`paired_ratio`."""
    return median_ci(_round_ratios(row, base), level)


def verdict(ci: tuple[float, float, float] | None, value: float | None, threshold: float) -> str:
    """``met`` / ``missed`` when the paired ratio's confidence interval lies wholly on one side of
    ``threshold``; ``within noise`` when it straddles it (or, without an interval, the point value
    decides: ``met (point)`` / ``missed (point)``)."""
    if ci is not None:
        lo, hi, _ = ci
        return "met" if hi <= threshold else "missed" if lo > threshold else "within noise"
    if value is None:
        return "not measured"
    return "met (point)" if value <= threshold else "missed (point)"


def add_ratios(res) -> None:
    step = res.get("step", {})
    base_row = step.get("adamw_fused", {}).get("eager")
    base_step = _med(base_row)
    for variants in step.values():
        for row in variants.values():
            row["ratio_vs_fused_adamw"] = _ratio(_med(row), base_step)
            row["paired_ratio_vs_fused_adamw"] = paired_ratio(row, base_row)
    it = res.get("iteration", {})
    base_it = _med(it.get("adamw_fused"))
    for row in it.values():
        row["ratio_vs_fused_adamw"] = _ratio(_med(row), base_it)
        row["paired_ratio_vs_fused_adamw"] = paired_ratio(row, it.get("adamw_fused"))
    for sect in ("refresh", "hvp"):
        for row in res.get(sect, {}).values():
            if isinstance(row, dict):
                # refresh / HVP cost in units of one fused-AdamW training iteration
                row["ratio_vs_fused_adamw"] = _ratio(_med(row), base_it)


def evaluate_targets(res) -> list[dict]:
    out = []

    def add(name, value, op, threshold, detail, skip_reason=None, pair=None, exact=False):
        """``pair=(row, base)``: the rows whose per-round ratios give the paired ratio and its interval;
        ``exact``: a count, not a timing (no noise: the verdict is the comparison itself)."""
        if value is None:
            out.append(dict(name=name, value=None, op=op, threshold=threshold, passed=None,
                            detail=skip_reason or "not measured", paired=None, ci=None, verdict="not measured"))
            return
        ok = value <= threshold + 1e-9 if op == "<=" else abs(value - threshold) < 1e-9
        paired = ci = None
        if pair is not None:
            paired, ci = paired_ratio(*pair), paired_ratio_ci(*pair)
            v = verdict(ci, paired if paired is not None else value, threshold)
        elif exact:
            v = "met" if ok else "missed"
        else:
            v = verdict(None, value, threshold)
        out.append(dict(name=name, value=value, op=op, threshold=threshold, passed=bool(ok), detail=detail,
                        paired=paired, ci=None if ci is None else list(ci), verdict=v))

    step = res.get("step", {})
    if step:
        fused = _med(step.get("adamw_fused", {}).get("eager"))
        authors = _med(step.get("sophia_opt", {}).get("eager"))
        for n in SOPHIA_FAMILY:
            if n not in step:
                continue
            e = _med(step[n].get("eager"))
            paths = [(_med(r), PATH_NAMES.get(p, p), p) for p, r in step[n].items() if _med(r) is not None]
            best = min(paths) if paths else (None, None, None)
            add(f"{n} step, fastest path <= 1.00x fused AdamW", _ratio(best[0], fused), "<=", 1.0,
                f"fastest = {best[1]}", pair=(step[n].get(best[2]), step.get("adamw_fused", {}).get("eager")))
            add(f"{n} step, eager <= 0.75x authors' SophiaG", _ratio(e, authors), "<=", 0.75,
                "eager vs eager", pair=(step[n].get("eager"), step.get("sophia_opt", {}).get("eager")))
        if "soap" in step or "po_soap" in step:
            ours = _med(step.get("soap", {}).get("eager"))
            theirs = _med(step.get("po_soap", {}).get("eager"))
            why = step.get("soap", {}).get("eager", {}).get("note") or step.get("po_soap", {}).get("eager", {}).get(
                "note"
            )
            floor = res.get("flops", {}).get("floor_vs_theirs")
            detail = "eager vs eager (incl. amortised eigenbasis refresh every 10 steps)"
            if floor:
                detail += f"; matmul FLOP floor of the algorithm = {floor:.3f}x theirs"
            add("SOAP step (ours) <= 0.50x pytorch_optimizer SOAP", _ratio(ours, theirs), "<=", 0.5, detail, why)
    it = res.get("iteration", {})
    if it:
        base = _med(it.get("adamw_fused"))
        for n, thr in (("sophia_g", 1.10), ("sophia_h", 1.25), ("flat_sophia", 1.25)):
            if n in it:
                keys = ((n, "eager step, separate refresh"), (n + "+fused", "eager step, fused refresh"))
                paths = [(_med(it[key]), path, key) for key, path in keys if _med(it.get(key)) is not None]
                best = min(paths) if paths else (None, None, None)
                add(f"{n} iteration (refresh every {it[n].get('k')}) <= {thr:.2f}x AdamW", _ratio(best[0], base),
                    "<=", thr, f"vs fused AdamW iteration; fastest = {best[1]}",
                    pair=(it.get(best[2]), it.get("adamw_fused")))
    rf = res.get("refresh", {})
    if "flat_sophia" in rf and "sophia_h" in rf:
        add("FlatSophia refresh <= 1.10x SophiaH refresh", _ratio(_med(rf["flat_sophia"]), _med(rf["sophia_h"])),
            "<=", 1.10, "Hutchinson + update_hessian (+ mask)")
    st = res.get("state", {})
    for n, op, thr in (("sophia_g", "==", 8.0), ("sophia_h", "==", 8.0), ("flat_sophia", "<=", 9.0)):
        if n in st:
            add(f"{n} state bytes/param {op} {thr:g}", st[n]["bytes_per_param"], op, thr,
                f"excl. 0-d step counters; incl. them: {st[n]['bytes_per_param_incl_scalars']:.4f}", exact=True)
    return out


# ------------------------------------------------------------------------------------ reporting


def _f(v, nd=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1000 or abs(v) < 10 ** -nd):
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def markdown(res) -> str:
    m = res["meta"]
    lines = [
        f"Model: {m['model_desc']} — {m['n_params']:,} parameters in {m['n_tensors']} tensors; "
        f"torch {m['torch']}, device {m.get('device', 'cpu')}, {m['threads']} thread(s), {m['cpu']}; "
        f"{m['rounds']} interleaved rounds.",
        "",
        "Times in ms (median, min, max, IQR over all per-call samples). `x fused AdamW`: step rows vs the "
        "eager fused-AdamW step; iteration, refresh and HVP rows vs the fused-AdamW training iteration "
        "(ratio of the medians). `paired`: the median over rounds of the same ratio taken within each round "
        "(step and iteration rows; less sensitive to the machine drifting between rounds).",
        "",
        "| section | optimizer / what | path | median | min | max | IQR | n | x fused AdamW | paired | compile s "
        "| note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def row(sect, label, path, r):
        if r.get("status", "ok") != "ok":
            dashes = " | ".join(["-"] * 9)
            lines.append(f"| {sect} | {label} | {path} | {dashes} | **{r['status']}**: {r['note']} |")
            return
        lines.append(
            f"| {sect} | {label} | {path} | {_ms(r.get('median_ms'))} | {_ms(r.get('min_ms'))} | "
            f"{_ms(r.get('max_ms'))} | {_ms(r.get('iqr_ms'))} | {r.get('n', '-')} | "
            f"{_f(r.get('ratio_vs_fused_adamw'), 2)} | {_f(r.get('paired_ratio_vs_fused_adamw'), 2)} | "
            f"{_f(r.get('compile_s'), 1)} | {r.get('note', '')} |"
        )

    for variants in res.get("step", {}).values():
        for variant, r in variants.items():
            row("step", r["label"], PATH_NAMES.get(variant, variant), r)
    for r in res.get("iteration", {}).values():
        row("iteration", r["label"], r.get("step_path") or "eager", r)
    for r in res.get("refresh", {}).values():
        row("refresh", r["label"], "eager", r)
    for r in res.get("hvp", {}).values():
        if isinstance(r, dict):
            row("hvp", r["label"], "eager", r)
    for key in ("ftz_off", "ftz_on"):
        r = res.get("denormal", {}).get(key)
        if r:
            row("denormal", r["label"], "eager", r)
    hv = res.get("hvp", {})
    if hv.get("faster"):
        lines += ["", f"HVP: **{hv['faster']}** is faster (forward-over-reverse / reverse-over-reverse = "
                  f"{hv['fwd_over_rev_vs_rev_over_rev']:.2f})."]
    dn = res.get("denormal", {})
    if dn.get("ftz_on_vs_off"):
        lines += [f"Denormal Hessian: SophiaH step with flush_denormal(True) / (False) = {dn['ftz_on_vs_off']:.2f}."]
    st = res.get("state", {})
    if st:
        lines += ["", "| optimizer | state bytes/param (excl. 0-d step) | incl. 0-d step tensors |", "|---|---:|---:|"]
        for r in st.values():
            lines.append(f"| {r['label']} | {r['bytes_per_param']:.4f} | {r['bytes_per_param_incl_scalars']:.4f} |")
    mem = res.get("memory", {})
    if mem:
        lines += ["", f"Peak memory ({mem['method']}):", "",
                  "| what | peak MiB | bytes/param |", "|---|---:|---:|"]
        for r in mem["rows"].values():
            lines.append(f"| {r['label']} | {r['peak_mib']:.1f} | {r['peak_bytes_per_param']:.1f} |")
    fl = res.get("flops", {})
    if any(isinstance(r, dict) for r in fl.values()):
        lines += ["", "SOAP matmul work (FlopCounterMode over one 10-step refresh cycle):", "",
                  "| SOAP | GFLOP/step | algorithm's floor GFLOP/step | note |", "|---|---:|---:|---|"]
        for r in fl.values():
            if isinstance(r, dict):
                gf = r.get("gflop_per_step")
                lines.append(f"| {r['label']} | {_f(gf, 2) if gf else '-'} | "
                             f"{_f(r.get('floor_gflop_per_step'), 2)} | {r.get('note') or r.get('status')} |")
        if fl.get("ours_vs_theirs"):
            lines += [f"FLOPs ours / pytorch_optimizer = {fl['ours_vs_theirs']:.3f}; floor / pytorch_optimizer = "
                      f"{fl['floor_vs_theirs']:.3f} (a matmul-bound step cannot be faster than this ratio)."]
    tg = res.get("targets", [])
    if tg:
        lines += ["", "`measured`: ratio of the medians (PASS/FAIL against the line); `paired [CI]`: median of the "
                  "per-round ratios with its distribution-free confidence interval (coverage in %, order statistics); "
                  "`verdict`: `met` / `missed` when that interval lies wholly on one side of the line, `within noise` "
                  "when it straddles it, `(point)` where there is no interval.", "",
                  "| target | measured | result | paired [CI] | verdict | detail |", "|---|---:|---|---|---|---|"]
        for t in tg:
            res_s = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
            val = "-" if t["value"] is None else f"{t['value']:.3f}"
            paired = "-" if t.get("paired") is None else f"{t['paired']:.3f}"
            if t.get("ci"):
                lo, hi, cov = t["ci"]
                paired += f" [{lo:.3f}, {hi:.3f}] ({100 * cov:.0f} %)"
            lines.append(f"| {t['name']} | {val} | {res_s} | {paired} | {t.get('verdict', '-')} | {t['detail']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main

SECTIONS = ("step", "refresh", "iteration", "memory", "denormal", "flops")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="vit",
                   help="vit (default), mlp, gpt, or experiment=<name>: the model of conf/experiment/<name>.yaml "
                   "(language models; e.g. experiment=sophia_charlm)")
    p.add_argument("--size", choices=("tiny", "small", "base"), default="base",
                   help="model preset; base ~5.4M parameters (default)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default per model/size)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:i]; CUDA timings synchronise (torch.utils.benchmark.Timer), "
                   "peak memory is torch.cuda.max_memory_allocated")
    p.add_argument("--rounds", type=int, default=None, help="interleaved measurement rounds (default 5; smoke 2)")
    p.add_argument("--soap-rounds", type=int, default=None,
                   help="rounds for the (slow) SOAP steps, 10 steps each (default 2; smoke 2)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds per candidate per round for steps (default 0.5; smoke 0.01)")
    p.add_argument("--min-run-time-heavy", type=float, default=None,
                   help="seconds per candidate per round for refresh/HVP (default 2; smoke 0.01)")
    p.add_argument("--k", type=int, default=10, help="iterations per Hessian refresh (default 10)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="skip the torch.compile rows (default: compile, except with --smoke)")
    p.add_argument("--compile", dest="compile", action="store_true", help="compile even with --smoke")
    p.add_argument("--compile-timeout", type=float, default=300.0, help="seconds allowed per compile")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--paths", default=",".join(PATH_NAMES),
                   help="step section: comma-separated subset of "
                   + ", ".join(f"{k} ({v})" for k, v in PATH_NAMES.items()))
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated subset of " + ",".join(OPTIMIZERS))
    p.add_argument("--smoke", action="store_true", help="tiny model, minimal repetitions, no compile (seconds)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of compile failures")
    a = p.parse_args(argv)
    if a.model not in ("vit", "mlp", "gpt") and not a.model.startswith("experiment="):
        p.error(f"invalid --model {a.model!r} (expected vit, mlp, gpt or experiment=<name>)")
    if a.smoke:
        a.size = "tiny"
    try:
        dev = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"invalid --device {a.device!r}: {e}")
    if dev.type not in ("cpu", "cuda"):
        p.error(f"--device {a.device!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device!r}: CUDA is not available in this torch build / machine")
    a.rounds = a.rounds or (2 if a.smoke else 5)
    a.soap_rounds = min(a.soap_rounds or 2, a.rounds)
    a.min_run_time = a.min_run_time if a.min_run_time is not None else (0.01 if a.smoke else 0.5)
    a.min_run_time_heavy = a.min_run_time_heavy if a.min_run_time_heavy is not None else (0.01 if a.smoke else 2.0)
    if a.compile is None:
        a.compile = not a.smoke
    # Smoke runs are for tests on possibly busy machines: one thread avoids OpenMP oversubscription.
    a.threads = a.threads or (1 if a.smoke else torch.get_num_threads())
    a.sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}")
    a.optimizers = [o for o in a.optimizers.split(",") if o]
    bad = [o for o in a.optimizers if o not in OPTIMIZERS]
    if bad:
        p.error(f"unknown optimizer(s) {bad}")
    if "adamw_fused" not in a.optimizers:
        a.optimizers.insert(0, "adamw_fused")  # the baseline of every ratio
    a.paths = [v for v in a.paths.split(",") if v]
    bad = [v for v in a.paths if v not in PATH_NAMES]
    if bad:
        p.error(f"unknown path(s) {bad} (expected a subset of {','.join(PATH_NAMES)})")
    if "eager" not in a.paths:
        a.paths.insert(0, "eager")  # every ratio and the state bytes come from the eager rows
    a.iter_optimizers = [o for o in ("adamw_fused", "adamw", *SOPHIA_FAMILY, "soap") if o in a.optimizers]
    return a


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(w) for k, w in v.items() if not str(k).startswith("_")}
    if isinstance(v, (list, tuple)):
        return [_jsonable(w) for w in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if torch.device(a.device).type == "cuda" and torch.device(a.device).index is not None:
        torch.cuda.set_device(torch.device(a.device))
    t_start = time.perf_counter()
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    bench = Bench(a)
    res: dict = {
        "meta": dict(
            command="python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            torch=torch.__version__,
            python=platform.python_version(),
            cpu=f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} cores",
            device=_device_name(bench.device),
            threads=a.threads,
            model=a.model,
            size=a.size,
            model_desc=bench.model_desc,
            n_params=bench.n_params,
            n_tensors=bench.n_tensors,
            predictions_per_step=bench.preds,
            rounds=a.rounds,
            min_run_time=a.min_run_time,
            min_run_time_heavy=a.min_run_time_heavy,
            k=a.k,
            compile=a.compile,
            smoke=a.smoke,
            loadavg_start=load0,
        )
    }
    if "step" in a.sections:
        bench.run_step(res)
    if "refresh" in a.sections:
        bench.run_refresh_and_hvp(res)
    if "iteration" in a.sections:
        bench.run_iteration(res)
    if "memory" in a.sections:
        bench.run_memory(res)
    if "denormal" in a.sections:
        bench.run_denormal(res)
    if "flops" in a.sections:
        bench.run_flops(res)
    add_ratios(res)
    res["targets"] = evaluate_targets(res)
    res["meta"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["meta"]["wall_s"] = round(time.perf_counter() - t_start, 1)
    res = _jsonable(res)
    res["markdown"] = markdown(res)
    if not a.quiet:
        print()
        print(res["markdown"])
        print(f"\n(wall time {res['meta']['wall_s']} s; load average start {load0}, end {res['meta']['loadavg_end']})")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"
    return "cpu"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
