"""Multi-head self-attention over (batch, tokens, dim) inputs.

Batch-first on purpose: the public PiT re-implementation fed (B, N, D) into ``nn.MultiheadAttention`` without
``batch_first=True``, which makes attention mix images across the batch. Here the batch axis is never touched by the
attention product; ``tests/test_layers.py`` checks that permuting the batch permutes the output.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "use_fused_attn"]


def use_fused_attn() -> bool:
    """Whether attention goes through ``F.scaled_dot_product_attention`` (default) or the manual path.

    ``PIXELFORMER_FUSED_ATTN=0`` turns the fused path off, e.g. for debugging or export.
    """
    return os.environ.get("PIXELFORMER_FUSED_ATTN", "1") != "0"


class Attention(nn.Module):
    """Multi-head self-attention with a fused (SDPA) path and an equivalent manual path.

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Bias on the query/key/value projection.
        attn_drop: Dropout on attention weights. On CPU a non-zero value makes SDPA fall back to its math kernel,
            which is slower and stores the full attention matrix.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}: pick heads that divide it")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        # (B, N, 3D) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(batch, tokens, dim)  # (B, N, D)
        return self.proj_drop(self.proj(x))
