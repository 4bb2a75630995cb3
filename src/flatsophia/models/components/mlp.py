"""Multi-layer perceptron: a classifier on the flattened input, or a next-token model on token data."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.checks import check_choice, check_int

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}
KINDS = ("signal", "image", "tokens")


class MLP(nn.Module):
    """``[Linear -> (LayerNorm) -> activation -> (Dropout)] * len(hidden_sizes) -> Linear`` on any data.

    - Signals and images (``kind`` ``signal``/``image``): the example is flattened; output logits
      ``(B, num_classes)``.
    - Tokens (``kind="tokens"``, int64 ids ``(B, T)``): a next-token model in the style of Bengio et
      al. (2003): each position's input is the embeddings of its ``context`` most recent tokens
      (itself included; zeros before the start) concatenated, so position ``t`` never sees a later
      token. Output logits ``(B, T, num_classes)``, ``num_classes`` being the vocabulary size.

    Args:
        input_shape: shape of one example (e.g. ``[40]``, ``[1, 8, 8]``, or ``[T]`` for tokens).
        num_classes: number of output logits (classes, or the vocabulary size for tokens).
        hidden_sizes: widths of the hidden layers (empty: a linear model).
        activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
        dropout: dropout after each hidden activation.
        norm: LayerNorm after each hidden linear layer.
        kind: what the data are: ``signal``, ``image`` or ``tokens`` (the data config's ``kind``).
        context: tokens only: how many recent tokens each prediction sees.
        embed_dim: tokens only: width of the token embedding.
    """

    #: Data kinds this model takes (read by the config check, see flatsophia.validation).
    accepts = KINDS

    def __init__(
        self,
        input_shape: Sequence[int] | int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (128, 128),
        activation: str = "gelu",
        dropout: float = 0.0,
        norm: bool = False,
        kind: str = "signal",
        context: int = 8,
        embed_dim: int = 32,
    ):
        super().__init__()
        check_choice("activation", activation, tuple(ACTIVATIONS))
        if not 0 <= dropout < 1:
            raise ValueError(f"Invalid dropout: {dropout!r} (expected a number in [0, 1))")
        check_choice("kind", kind, KINDS)
        self.kind = kind
        layers: list[nn.Module] = []
        if kind == "tokens":
            check_int("context", context, 1)
            check_int("embed_dim", embed_dim, 1)
            self.context = context
            self.embed = nn.Embedding(num_classes, embed_dim)
            in_features = context * embed_dim
        else:
            shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
            in_features = math.prod(shape)
            layers.append(nn.Flatten())
        for width in hidden_sizes:
            layers.append(nn.Linear(in_features, int(width)))
            if norm:
                layers.append(nn.LayerNorm(int(width)))
            layers.append(ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
            in_features = int(width)
        layers.append(nn.Linear(in_features, num_classes))
        self.layers = nn.Sequential(*layers)

    def _windows(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, context * embed_dim)``: each position's recent embeddings, oldest first."""
        e = F.pad(self.embed(idx), (0, 0, self.context - 1, 0))  # zeros before the first token
        return e.unfold(1, self.context, 1).transpose(2, 3).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self._windows(x) if self.kind == "tokens" else x)
