"""A small Vision Transformer for 1-D signals (e.g. MNIST-1D), built from timm's transformer ``Block``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

__all__ = ["ViT1D"]

POOLS = ("cls", "mean")


class ViT1D(nn.Module):
    """Patchify a signal into non-overlapping windows, add positions, run transformer blocks, classify.

    Input ``(B, L)`` or ``(B, C, L)``; output logits ``(B, num_classes)``.

    Args:
        input_shape: ``[L]`` or ``[C, L]`` of one example.
        num_classes: number of output logits.
        patch_size: samples per token; must divide ``L``.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide ``embed_dim``).
        mlp_ratio: hidden width of each block's MLP relative to ``embed_dim``.
        pool: ``"cls"`` (a learned class token) or ``"mean"`` (average of the patch tokens).
        drop_rate: dropout on embeddings and inside the blocks' projections.
        attn_drop_rate: dropout on attention weights.
        qkv_bias: bias in the query/key/value projection.
    """

    #: Data kinds this model takes (read by the config check, see flatsophia.validation).
    accepts = ("signal",)

    def __init__(
        self,
        input_shape: Sequence[int] | int = (40,),
        num_classes: int = 10,
        patch_size: int = 4,
        embed_dim: int = 64,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            shape = (1, shape[0])
        if len(shape) != 2:
            raise ValueError(f"Invalid input_shape: {input_shape!r} (expected [L] or [C, L])")
        in_chans, length = shape
        if patch_size < 1 or length % patch_size:
            raise ValueError(f"Invalid patch_size: {patch_size!r} (must divide the signal length {length})")
        if embed_dim % num_heads:
            raise ValueError(f"Invalid num_heads: {num_heads!r} (must divide embed_dim={embed_dim})")
        if pool not in POOLS:
            raise ValueError(f"Invalid pool: {pool!r} (choose one of {', '.join(POOLS)})")
        self.in_chans, self.length, self.pool = in_chans, length, pool
        self.num_patches = length // patch_size
        self.patch_embed = nn.Conv1d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        n_tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(
            *[
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (positional table, class token)."""
        return {"pos_embed", "cls_token"} if self.cls_token is not None else {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.shape[1:] != (self.in_chans, self.length):
            raise ValueError(
                f"ViT1D expected inputs of shape (B, {self.in_chans}, {self.length}) or (B, {self.length}); "
                f"got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x).transpose(1, 2)  # (B, N, D)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.blocks(self.pos_drop(tokens + self.pos_embed))
        tokens = self.norm(tokens)
        pooled = tokens[:, 0] if self.cls_token is not None else tokens.mean(dim=1)
        return self.head(pooled)
