"""Patch embedding that is a plain matrix multiply, down to 1x1 patches (one token per pixel)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PatchEmbed"]

Size = Union[int, Sequence[int]]


def _square(size: Size, what: str) -> int:
    """An int side from an int or an (h, w) pair with h == w (timm passes pairs)."""
    if isinstance(size, int):
        return size
    h, w = size
    if h != w:
        raise ValueError(f"{what} must be square, got {tuple(size)}")
    return int(h)


class PatchEmbed(nn.Module):
    """Split an image into ``patch_size`` x ``patch_size`` patches and project each to ``embed_dim``.

    Kept instead of timm's ``PatchEmbed`` because MAE and DiT need ``patchify`` / ``unpatchify`` with int sizes, and
    the pixel case is one reshape + ``F.linear`` rather than a 1x1 convolution. The weight is stored as
    ``proj.weight`` (D, C, p, p), the layout of timm's Conv2d patch embedding, so checkpoints interchange. The
    constructor takes the keywords timm's ``VisionTransformer`` passes to its ``embed_layer``.

    Args:
        img_size: Input height and width (square).
        patch_size: Patch side; 1 makes every pixel a token.
        in_chans: Input channels (1 for digits, 3 for RGB, 4 for latents, ...).
        embed_dim: Token width.
        bias: Bias on the projection (timm turns it off for ``pre_norm``).
    """

    def __init__(self, img_size: Size, patch_size: Size, in_chans: int, embed_dim: int, bias: bool = True,
                 dynamic_img_pad: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        img_size, patch_size = _square(img_size, "img_size"), _square(patch_size, "patch_size")
        if dynamic_img_pad:
            raise ValueError("dynamic_img_pad is not supported: pick an image size that the patch size divides")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self._set_img_size(img_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias,
                              device=device, dtype=dtype)

    def _set_img_size(self, img_size: int) -> None:
        if img_size % self.patch_size != 0:
            p = self.patch_size
            raise ValueError(
                f"img_size {img_size} is not divisible by patch_size {p}: choose an image size that is a "
                f"multiple of the patch size (e.g. {img_size - img_size % p or p}) or another patch size"
            )
        self.img_size = img_size
        self.grid_size = img_size // self.patch_size
        self.num_patches = self.grid_size ** 2

    # timm's VisionTransformer asks these of its embed_layer (feature_info, forward_intermediates, set_input_size).
    def feat_ratio(self, as_scalar: bool = True) -> Union[int, tuple[int, int]]:
        return self.patch_size if as_scalar else (self.patch_size, self.patch_size)

    def dynamic_feat_size(self, img_size: Sequence[int]) -> tuple[int, int]:
        """(H, W) -> the token grid (H / p, W / p)."""
        return img_size[0] // self.patch_size, img_size[1] // self.patch_size

    def set_input_size(self, img_size: Optional[Size] = None, patch_size: Optional[Size] = None) -> None:
        """Change the input size in place (the projection is kept); the patch size cannot change."""
        if patch_size is not None and _square(patch_size, "patch_size") != self.patch_size:
            raise ValueError("changing the patch size of a trained model is not supported")
        if img_size is not None:
            self._set_img_size(_square(img_size, "img_size"))

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
