"""Untrained timm models (ViT, ResNet, ...) by name, with an optional small-image stem for ResNets."""

from __future__ import annotations

import timm
from torch import nn

__all__ = ["timm_model"]


def timm_model(name: str, small_stem: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``, returning logits.

    Args:
        name: a timm architecture, e.g. ``"vit_tiny_patch16_224"`` (its geometry is overridden by
            ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``,
            ``in_chans``, ``num_classes``, ``drop_rate``, ...) or ``"resnet18"``.
        small_stem: ResNets only: replace the 7x7/stride-2 stem and its max-pool by a 3x3/stride-1
            convolution, as usual for 32x32 (CIFAR) or smaller images.
        **kwargs: passed to ``timm.create_model``.

    Weights are never downloaded (``pretrained=False``): the models train from scratch.
    """
    if not timm.is_model(name):
        raise ValueError(f"Unknown timm model {name!r}; see timm.list_models() for the names")
    model = timm.create_model(name, pretrained=False, **kwargs)
    if small_stem:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise ValueError(f"small_stem=True needs a ResNet-style model with conv1 and maxpool; {name!r} has not")
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


#: Data kinds the timm models of the configs take (read by the config check, see flatsophia.validation).
timm_model.accepts = ("image",)
