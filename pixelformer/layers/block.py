"""Pre-norm transformer block (ViT / MAE encoder block)."""
from __future__ import annotations

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from .attention import Attention

__all__ = ["Block"]


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``, with optional stochastic depth.

    Parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) match timm's
    ``VisionTransformer`` so that timm and MAE checkpoints map onto this block key for key. ``norm_eps`` is the
    LayerNorm epsilon: 1e-6 in timm's ViT and MAE's model definitions, 1e-5 (PyTorch's default) in some checkpoints.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop: float = 0.0,
            attn_drop: float = 0.0,
            drop_path: float = 0.0,
            norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x
