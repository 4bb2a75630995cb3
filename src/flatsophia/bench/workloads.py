"""What the benchmark runs: a model of the project's own on a fixed random batch, and the optimizers.

Models (``--model``) come from :mod:`flatsophia.models.components`:

* ``vit`` (default): ``timm_model("vit_small_patch16_224", img_size=32, patch_size=4, embed_dim=384,
  num_heads=6, depth=3, num_classes=100)``, 5,406,820 parameters, batch 32 of 3x32x32 images;
* ``gpt``: :class:`~flatsophia.models.components.GPT` (vocabulary 2048, context 64, 6 layers of width
  256, 4 heads), 5.3M parameters, batch 16 sequences (1,024 predictions);
* ``mlp``: :class:`~flatsophia.models.components.MLP` 3072-1024-1024-1024-100 (GELU, LayerNorm),
  batch 128;
* ``smoke``: a one-block ViT on 16x16 images (``--smoke``; for the tests);
* ``experiment=<name>``: the model of a language-model experiment config (e.g. ``sophia_charlm``),
  composed from ``conf/`` as ``src/train.py`` does, with that experiment's batch and context.

Optimizers: the registry :data:`flatsophia.optim.OPTIMIZERS` with its defaults (SophiaG with
``bs`` = predictions per step), plus two baselines: ``adamw_fused``, torch's AdamW with
``fused=True``, the reference of every ratio, and ``sophia_opt``, the authors' SophiaG
(``pip install sophia-opt``), when installed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.optim import OPTIMIZERS, create_optimizer, get_spec, param_groups

__all__ = [
    "MODELS",
    "REFERENCE",
    "Workload",
    "Unavailable",
    "build_workload",
    "optimizer_names",
    "kernels",
    "make_optimizer",
    "authors_sophia_g",
]

#: The baseline of every ratio.
REFERENCE = "adamw_fused"
MODELS = ("vit", "gpt", "mlp", "smoke")
VIT = dict(img_size=32, patch_size=4, embed_dim=384, num_heads=6, depth=3, num_classes=100)
SMOKE_VIT = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=1, num_classes=10)


class Unavailable(Exception):
    """An optional optimizer that is not installed."""


@dataclass
class Workload:
    """A model and one fixed batch; :meth:`closures` gives ``forward()`` and ``loss_fn(logits)``."""

    name: str
    description: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor  # flattened: one class per prediction
    predictions: int  # per step (SophiaG's ``bs``)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def n_tensors(self) -> int:
        return sum(1 for p in self.model.parameters() if p.requires_grad)

    def to(self, device: torch.device) -> Workload:
        self.model.to(device)
        self.inputs, self.targets = self.inputs.to(device), self.targets.to(device)
        return self

    def closures(self, model: nn.Module, rows: slice = slice(None)):
        """``forward()`` -> logits of ``model`` shaped ``(predictions, classes)``; ``loss_fn`` -> mean
        cross-entropy; over the examples ``rows`` of the batch (default all)."""
        per = self.targets.numel() // self.inputs.shape[0]  # predictions per example
        start, stop, _ = rows.indices(self.inputs.shape[0])
        x, y = self.inputs[start:stop], self.targets[start * per : stop * per]

        def forward() -> torch.Tensor:
            out = model(x)
            return out.reshape(-1, out.shape[-1])

        def loss_fn(logits: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, y)

        return forward, loss_fn

    def chunks(self, model: nn.Module, n: int):
        """For a refresh on the first ``n`` examples: ``(subset, rest, share)``, the closures of
        :meth:`closures` over the first ``n`` examples and over the others, and the subset's share
        of the mean loss; ``None`` when ``n`` is the whole batch."""
        b = self.inputs.shape[0]
        if n >= b:
            return None
        return self.closures(model, slice(None, n)), self.closures(model, slice(n, None)), n / b


def build_workload(name: str = "vit", batch: int | None = None, seed: int = 0) -> Workload:
    """The workload ``name`` (see the module docstring), its model and data drawn from ``seed``."""
    if name.startswith("experiment="):
        return _experiment(name.split("=", 1)[1], batch, seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name in ("vit", "smoke"):
        from flatsophia.models.components import timm_model

        cfg = VIT if name == "vit" else SMOKE_VIT
        b = batch or (32 if name == "vit" else 8)
        model = timm_model("vit_small_patch16_224", **cfg)
        x = torch.randn(b, 3, cfg["img_size"], cfg["img_size"], generator=gen)
        y = torch.randint(0, cfg["num_classes"], (b,), generator=gen)
        geometry = ", ".join(f"{k}={v}" for k, v in cfg.items())
        desc = f'timm_model("vit_small_patch16_224", {geometry}), batch {b}'
    elif name == "gpt":
        from flatsophia.models.components import GPT

        vocab, ctx, b = 2048, 64, batch or 16
        model = GPT(vocab_size=vocab, block_size=ctx, n_layer=6, n_head=4, n_embd=256)
        x = torch.randint(0, vocab, (b, ctx), generator=gen)
        y = torch.randint(0, vocab, (b, ctx), generator=gen)
        desc = f"GPT(vocab_size={vocab}, block_size={ctx}, n_layer=6, n_head=4, n_embd=256), batch {b}x{ctx} tokens"
    elif name == "mlp":
        from flatsophia.models.components import MLP

        hidden, b = (1024, 1024, 1024), batch or 128
        model = MLP((3, 32, 32), 100, hidden_sizes=hidden, activation="gelu", norm=True)
        x = torch.randn(b, 3, 32, 32, generator=gen)
        y = torch.randint(0, 100, (b,), generator=gen)
        desc = f"MLP(3072-{'-'.join(map(str, hidden))}-100, GELU, LayerNorm), batch {b}"
    else:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)} or experiment=<name>")
    y = y.reshape(-1)
    return Workload(name, desc, model, x, y, y.numel())


def _experiment(name: str, batch: int | None, seed: int) -> Workload:
    """The model of the language-model experiment ``conf/experiment/<name>.yaml``, instantiated as
    ``src/train.py`` does, on random token ids shaped like its batches."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from flatsophia.experiments.studies import project_root

    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    if cfg.data.get("kind") != "tokens":
        raise ValueError(
            f"experiment={name}: only language-model experiments (data of kind tokens, e.g. sophia_charlm) "
            "are supported"
        )
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    (t,) = cfg.data.input_shape
    b, t, v = batch or int(cfg.data.batch_size), int(t), int(cfg.data.num_classes)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, v, (b, t), generator=gen), torch.randint(0, v, (b, t), generator=gen)
    kind = cfg.model._target_.rsplit(".", 1)[-1]
    desc = f"experiment={name}: {kind}, batch {b}x{t} tokens"
    return Workload(f"experiment={name}", desc, model, x, y.reshape(-1), b * t)


# ------------------------------------------------------------------------------ optimizers


def authors_sophia_g() -> type | None:
    """The authors' ``SophiaG`` (the ``sophia-opt`` wheel imports as ``sophia_opt``; a checkout as ``sophia``)."""
    for module in ("sophia_opt", "sophia"):
        try:
            return __import__(module).SophiaG
        except (ImportError, AttributeError):
            continue
    return None


def optimizer_names() -> list[str]:
    """The reference, the registry's optimizers, then the authors' SophiaG."""
    return [REFERENCE, *OPTIMIZERS, "sophia_opt"]


def hessian_of(name: str) -> str:
    """The estimator optimizer ``name`` consumes: ``"none"``, ``"gnb"``, ``"hutchinson"``; the
    authors' SophiaG: ``"authors"`` (its own loop fills ``.grad`` and calls ``update_hessian()``)."""
    if name == REFERENCE:
        return "none"
    if name == "sophia_opt":
        return "authors"
    return get_spec(name).hessian


def kernels(name: str) -> tuple[str | None, ...]:
    """The step kernels to time: ``("single", "multi")`` (``foreach=False/True``) where the optimizer
    offers the choice, else ``(None,)`` (its one path)."""
    if name in (REFERENCE, "sophia_opt"):
        return (None,)
    return ("single", "multi") if "foreach" in inspect.signature(get_spec(name).cls).parameters else (None,)


def make_optimizer(name: str, model: nn.Module, predictions: int, kernel: str | None = None) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``model``'s parameter groups (weight decay on matrices), with its defaults.

    ``kernel``: ``"single"`` / ``"multi"`` pass ``foreach=False`` / ``True``; ``None`` the default.
    Raises :class:`Unavailable` for the authors' SophiaG when it is not installed.
    """
    if name == REFERENCE:
        return create_optimizer(model, "adamw", fused=True)
    if name == "sophia_opt":
        cls = authors_sophia_g()
        if cls is None:
            raise Unavailable("sophia-opt is not installed (pip install sophia-opt)")
        return cls(param_groups(model))
    params = inspect.signature(get_spec(name).cls).parameters
    kwargs = {}
    if "bs" in params:
        kwargs["bs"] = predictions
    if kernel is not None:
        kwargs["foreach"] = kernel == "multi"
    return create_optimizer(model, name, **kwargs)


LABELS = {REFERENCE: "AdamW (torch, fused=True)", "sophia_opt": "SophiaG (authors' sophia-opt)"}


def label(name: str) -> str:
    """A row's name for tables: the registry name, or the baseline's description."""
    return LABELS.get(name, name)
