"""Register every pixelformer backbone with timm as ``pixelformer_<name>`` (a backbone registered later included).

timm already owns ``pit_*`` (Pooling-based ViT), hence the prefix. After ``import pixelformer``::

    timm.create_model("pixelformer_pit_tiny", num_classes=100)
    timm.create_model("pixelformer_pit_mini", features_only=True, out_indices=(1, 3))  # per-block NCHW maps
    timm.create_model("pixelformer_pit_mini", checkpoint_path="run/checkpoints/best.ckpt", img_size=8, in_chans=1,
                      num_classes=10)  # a pixelformer checkpoint: the backbone of a cls or mae run

``pretrained_cfg_overlay`` (e.g. the mean / std of the data) is merged into the model's ``pretrained_cfg``.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

from timm.models import _factory, register_model
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureGetterNet
from torch import nn

from ._registry import _ENTRYPOINTS, _ON_REGISTER, create_backbone, list_backbones

__all__ = ["TIMM_PREFIX", "register_with_timm"]

TIMM_PREFIX = "pixelformer_"


def _timm_entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = False, pretrained_cfg: Optional[Any] = None,
                   pretrained_cfg_overlay: Optional[dict] = None, features_only: bool = False,
                   out_indices: Any = 3, feature_cls: str = "getter", output_fmt: str = "NCHW", **kwargs: Any
                   ) -> nn.Module:
        if pretrained:
            raise ValueError("pixelformer ships no pretrained weights; pass checkpoint_path= to load your own")
        kwargs.pop("cache_dir", None)
        model = create_backbone(name, **kwargs)
        model._pixelformer_backbone = True  # its missing checkpoint_path is named (_load_checkpoint_naming_the_file)
        cfg = dict(getattr(model, "pretrained_cfg", {}))
        if isinstance(pretrained_cfg, dict):
            cfg.update(pretrained_cfg)
        cfg.update(pretrained_cfg_overlay or {})
        model.pretrained_cfg = model.default_cfg = cfg
        if features_only:
            # timm's ViT recipe (_create_vision_transformer): forward_intermediates behind a FeatureGetterNet.
            if feature_cls != "getter":
                raise ValueError(f"feature_cls={feature_cls!r}: pixelformer backbones give features through "
                                 f"forward_intermediates (feature_cls='getter')")
            model = FeatureGetterNet(model, out_indices=out_indices, output_fmt=output_fmt)
            model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = TIMM_PREFIX + name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"pixelformer's {name} for timm.create_model."
    return entrypoint


def _load_checkpoint_naming_the_file(load: Callable[..., Any]) -> Callable[..., Any]:
    """timm's ``load_checkpoint``, except that a missing ``checkpoint_path`` for a pixelformer model is named: timm
    logs it and raises a ``FileNotFoundError`` with an empty message."""
    if getattr(load, "_names_missing_file", False):
        return load

    def load_checkpoint(model: nn.Module, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        ours = getattr(model, "_pixelformer_backbone", False) or \
            getattr(getattr(model, "model", None), "_pixelformer_backbone", False)  # features_only: a wrapper
        if ours and not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint_path={checkpoint_path}: no such file (pass a pixelformer run's "
                                    f"checkpoints/best.ckpt or last.ckpt, or a state dict saved with torch.save)")
        return load(model, checkpoint_path, *args, **kwargs)

    load_checkpoint._names_missing_file = True  # type: ignore[attr-defined]
    load_checkpoint.__doc__ = load.__doc__
    return load_checkpoint


# timm.create_model calls the name it imported into timm.models._factory (after building the model): wrapped there.
_factory.load_checkpoint = _load_checkpoint_naming_the_file(_factory.load_checkpoint)


def _register(fn: Callable[..., nn.Module]) -> None:
    wrapped = _timm_entrypoint(fn.__name__)
    setattr(sys.modules[__name__], wrapped.__name__, wrapped)
    register_model(wrapped)


def register_with_timm() -> None:
    """Register every backbone now in the registry, and every one registered from now on."""
    for name in list_backbones():
        _register(_ENTRYPOINTS[name])
    if _register not in _ON_REGISTER:
        _ON_REGISTER.append(_register)


register_with_timm()
