"""Multi-layer perceptron classifier that flattens its input."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ACTIVATIONS"]

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class MLP(nn.Module):
    """``Flatten -> [Linear -> (LayerNorm) -> activation -> (Dropout)] * len(hidden_sizes) -> Linear``.

    Args:
        input_shape: shape of one example (e.g. ``[40]`` or ``[1, 8, 8]``); flattened.
        num_classes: number of output logits.
        hidden_sizes: widths of the hidden layers (empty: a linear classifier).
        activation: one of ``relu``, ``gelu``, ``tanh``, ``silu``.
        dropout: dropout after each hidden activation.
        norm: LayerNorm after each hidden linear layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int] | int,
        num_classes: int,
        hidden_sizes: Sequence[int] = (128, 128),
        activation: str = "gelu",
        dropout: float = 0.0,
        norm: bool = False,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation: {activation!r} (choose one of {', '.join(ACTIVATIONS)})")
        if not 0 <= dropout < 1:
            raise ValueError(f"Invalid dropout: {dropout!r} (expected a number in [0, 1))")
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        in_features = math.prod(shape)
        layers: list[nn.Module] = [nn.Flatten()]
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
