"""Plain ``nn.Module`` networks (no Lightning); every one returns logits.

- :class:`ViT1D`: a small Vision Transformer over 1-D signals (timm blocks).
- :class:`MLP`: flattens its input; configurable hidden sizes.
- :class:`GPT`: a small nanoGPT-style character model, logits ``(B, T, V)``.
- :func:`timm_model`: any timm architecture (``vit_*``, ``resnet*``), untrained.
"""

from .gpt import GPT
from .mlp import MLP
from .timm_models import timm_model
from .vit1d import ViT1D

__all__ = ["ViT1D", "MLP", "GPT", "timm_model"]
