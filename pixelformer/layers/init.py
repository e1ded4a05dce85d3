"""The weight init the pixel transformers share (the MAE / PiT recipe), in one place for the ViT and the hourglass."""
from __future__ import annotations

from typing import Iterable

from torch import nn
from timm.layers import trunc_normal_

__all__ = ["init_linears_and_norms", "init_transformer_weights"]


def init_linears_and_norms(modules: Iterable[nn.Module]) -> None:
    """Every ``nn.Linear`` in ``modules`` trunc-normal .02 with zero bias and every affine ``nn.LayerNorm`` ones /
    zeros, in the order given (MAE's init; the MAE decoder uses it alone, on the modules outside its encoder)."""
    for m in modules:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_transformer_weights(model: nn.Module, patch_proj: nn.Conv2d) -> None:
    """The patch projection xavier-uniform as the linear layer it is, then every ``nn.Linear`` trunc-normal .02 with
    zero bias and every affine ``nn.LayerNorm`` ones / zeros, in module order.

    Kept instead of timm's init so that committed results reproduce: the order of the random draws is part of them.
    """
    w = patch_proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    if patch_proj.bias is not None:
        nn.init.zeros_(patch_proj.bias)
    init_linears_and_norms(model.modules())
