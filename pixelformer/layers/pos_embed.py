"""Absolute position embeddings: fixed 2D sin-cos tables and resizing of learned tables to a new grid."""
from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed

__all__ = ["build_sincos_2d_pos_embed", "resize_pos_embed"]


def build_sincos_2d_pos_embed(embed_dim: int, grid_size: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2D sin-cos embedding of shape (1, num_prefix_tokens + grid_size**2, embed_dim).

    Half of the channels encode the row, half the column (MAE's layout); prefix (CLS) tokens get zeros.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1).float()
    table = torch.cat([torch.zeros(num_prefix_tokens, embed_dim), table], dim=0)
    return table.unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Resample a learned (1, prefix + g*g, D) embedding to (1, prefix + new_grid**2, D).

    The grid part is interpolated bicubically (in float32, by timm's ``resample_abs_pos_embed``); prefix tokens such as
    CLS are kept apart and copied unchanged.
    """
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    old_grid = int(round(num_grid ** 0.5))
    if old_grid * old_grid != num_grid:
        raise ValueError(f"position embedding with {num_grid} grid tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed, new_size=[new_grid, new_grid], old_size=[old_grid, old_grid], num_prefix_tokens=num_prefix_tokens
    )
