"""A small GPT (decoder-only transformer) for character-level language modelling, in the style of nanoGPT.

Causal self-attention uses ``F.scaled_dot_product_attention(is_causal=True)``. For a Hessian-vector
product through it (Sophia-H, FlatSophia) the training module selects the math kernel, the only one
with a double backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT"]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, scale_divisor: float = 1.0):
        super().__init__()
        self.n_head = n_head
        # attention logits are q.k / sqrt(head dim) / scale_divisor
        self.scale = 1.0 / math.sqrt(n_embd // n_head) / scale_divisor
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class MLPBlock(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, scale_divisor: float = 1.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, scale_divisor)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLPBlock(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` pre-norm blocks, final LayerNorm, linear head.

    Input int64 ids ``(B, T)`` with ``T <= block_size``; output logits ``(B, T, vocab_size)``.

    Args:
        vocab_size: number of token ids (256 for the byte-level datamodules).
        block_size: maximum context length (size of the position table).
        n_layer, n_head, n_embd: depth, attention heads, width (``n_head`` divides ``n_embd``).
        dropout: dropout on embeddings, attention weights and residual branches.
        bias: biases in linear layers and LayerNorms.
        tie_weights: share the token embedding with the output head (as GPT-2 and nanoGPT).
        scale_attn_by_inverse_layer_idx: divide the attention logits of block ``i`` (from 0) by
            ``i + 1`` as well, as the Sophia authors' GPT-2 runs (their ``model.py``; off in nanoGPT).
        decay_token_embedding: whether weight decay applies to the token embedding (shared with the
            head when tied) under ``module.weight_decay_rule=matrices``; nanoGPT and Sophia do not decay it.
    """

    #: Data kinds this model takes (read by the config check, see flatsophia.validation).
    accepts = ("tokens",)

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        decay_token_embedding: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 1)")
        if n_embd % n_head:
            raise ValueError(f"Invalid n_head: {n_head!r} (must divide n_embd={n_embd})")
        if not 0 <= dropout < 1:
            raise ValueError(f"Invalid dropout: {dropout!r} (expected a number in [0, 1))")
        self.block_size = block_size
        self.decay_token_embedding = bool(decay_token_embedding)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        inverse_idx = bool(scale_attn_by_inverse_layer_idx)
        self.blocks = nn.ModuleList(
            [Block(n_embd, n_head, dropout, bias, float(i + 1) if inverse_idx else 1.0) for i in range(n_layer)]
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (the position table; the token embedding too
        unless ``decay_token_embedding``)."""
        return {"wpe.weight"} if self.decay_token_embedding else {"wpe.weight", "wte.weight"}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        if t > self.block_size:
            raise ValueError(f"Sequence length {t} exceeds block_size={self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
