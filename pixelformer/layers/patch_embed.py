"""Patch embedding that is a plain matrix multiply, down to 1x1 patches (one token per pixel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """Split an image into ``patch_size`` x ``patch_size`` patches and project each to ``embed_dim``.

    The weight is stored as ``proj.weight`` of shape (D, C, p, p), the layout of timm's Conv2d patch embedding, so
    checkpoints interchange; the forward is a reshape and one ``F.linear``, which is what a 1x1 "conv" really is.

    Args:
        img_size: Input height and width (square).
        patch_size: Patch side; 1 makes every pixel a token.
        in_chans: Input channels (1 for digits, 3 for RGB, 4 for latents, ...).
        embed_dim: Token width.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if img_size % patch_size != 0:
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {patch_size}: choose an image size that is a "
                f"multiple of the patch size (e.g. {img_size - img_size % patch_size or patch_size}) or another patch size"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) with N = (H / p) * (W / p), tokens in row-major order."""
        batch, chans, height, width = x.shape
        if chans != self.in_chans or height != self.img_size or width != self.img_size:
            raise ValueError(
                f"input of shape {tuple(x.shape[1:])} does not match the model's (in_chans, img_size, img_size) = "
                f"({self.in_chans}, {self.img_size}, {self.img_size}): set model/data img_size and in_chans to match "
                f"the data, or resize the position embedding with set_input_size()"
            )
        return F.linear(self.patchify(x), self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)

    def unpatchify(self, tokens: torch.Tensor, chans: int | None = None) -> torch.Tensor:
        """(B, N, p*p*C) per-token pixel values in (C, p, p) order -> (B, C, H, W). Inverse of ``patchify``."""
        chans = chans or self.in_chans
        batch = tokens.shape[0]
        p, g = self.patch_size, self.grid_size
        x = tokens.reshape(batch, g, g, chans, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(batch, chans, g * p, g * p)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C*p*p) raw pixel values per token, channel-major inside a patch."""
        batch, chans, height, width = x.shape
        p = self.patch_size
        x = x.reshape(batch, chans, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(batch, (height // p) * (width // p), chans * p * p)
