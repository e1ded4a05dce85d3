"""Absolute position embeddings: fixed 2D sin-cos tables and resizing of learned tables to a new grid."""
from __future__ import annotations

import math

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

__all__ = ["build_sincos_2d_pos_embed", "is_sincos_table", "load_fixed_table", "resize_pos_embed"]

# Equality of a stored fixed table with the one computed here: float32 storage rounds at ~1e-7, bf16 at ~4e-3 is not
# accepted; a learned table moves by ~lr per step, so even a briefly trained one is told apart.
SINCOS_ATOL = 1e-4


def build_sincos_2d_pos_embed(embed_dim: int, grid_size: int, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Fixed 2D sin-cos embedding of shape (1, num_prefix_tokens + grid_size**2, embed_dim).

    The layout of MAE's and DiT's ``get_2d_sincos_pos_embed``: tokens in row-major order; the first half of the
    channels encodes the column (x) of a token, the second half its row (y); each half is ``[sin(pos * omega),
    cos(pos * omega)]`` with ``omega_k = 10000 ** (-k / (embed_dim / 4))``. Prefix (CLS) tokens get zeros.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # rows[r, c] = r, cols[r, c] = c

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1).float()
    table = torch.cat([torch.zeros(num_prefix_tokens, embed_dim), table], dim=0)
    return table.unsqueeze(0)


def is_sincos_table(table: torch.Tensor, num_prefix_tokens: int) -> bool:
    """Whether a stored (1, prefix + g*g, D) table is the fixed sin-cos table of its own grid, to storage rounding.

    Lets a checkpoint that saved its fixed table (the reference MAE and DiT keep it as a frozen parameter) load into a
    model that computes the table itself, at any grid, while a learned table is told apart.
    """
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[-1] % 4 != 0:
        return False
    grid = math.isqrt(max(table.shape[1] - num_prefix_tokens, 0))
    if grid == 0 or grid * grid != table.shape[1] - num_prefix_tokens:
        return False
    expected = build_sincos_2d_pos_embed(table.shape[-1], grid, num_prefix_tokens)
    return torch.allclose(table.detach().float().cpu(), expected, atol=SINCOS_ATOL, rtol=0)


def load_fixed_table(module: nn.Module, name: str, state_dict: dict, prefix: str, error_msgs: list[str]) -> None:
    """For ``module._load_from_state_dict``: take a saved copy of the non-persistent fixed table ``name`` out of
    ``state_dict``, accepting it when it equals the module's own table and refusing it by name when it differs.

    Without this, strict loading reports the key as unexpected and ``strict=False`` drops a learned table silently.
    """
    key = prefix + name
    if key not in state_dict or name not in module._non_persistent_buffers_set:
        return
    saved, own = state_dict.pop(key), getattr(module, name)
    if saved.shape != own.shape or not torch.allclose(saved.detach().float().cpu(), own.detach().float().cpu(),
                                                      atol=SINCOS_ATOL, rtol=0):
        error_msgs.append(
            f"{key}: the checkpoint holds a position table {tuple(saved.shape)} that differs from this model's fixed "
            f"sin-cos table {tuple(own.shape)} (model.pos_embed=sincos): set model.pos_embed=learned to load it"
        )


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
