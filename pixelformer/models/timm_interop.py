"""Register every pixelformer backbone with timm as ``pixelformer_<name>``.

timm already owns ``pit_*`` (Pooling-based ViT), hence the prefix. After ``import pixelformer``,
``timm.create_model("pixelformer_pit_tiny", num_classes=100)`` builds our model.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from timm.models import register_model
from torch import nn

from ._registry import create_backbone, list_backbones

__all__ = ["TIMM_PREFIX", "register_with_timm"]

TIMM_PREFIX = "pixelformer_"


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError("pixelformer ships no pretrained weights; pass checkpoint_path= to load your own")
        # timm passes its pretrained-cfg plumbing through; our constructors take architecture arguments only.
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return create_backbone(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = TIMM_PREFIX + name
    entrypoint.__module__ = __name__
    return entrypoint


def register_with_timm() -> None:
    module = sys.modules[__name__]
    for name in list_backbones():
        fn = _timm_entrypoint(name)
        setattr(module, fn.__name__, fn)
        register_model(fn)


register_with_timm()
