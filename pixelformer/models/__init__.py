"""Backbones. Importing a model module registers its entrypoints, so the list below is the registry's contents."""
from ._registry import create_backbone, describe_backbone, is_backbone, list_backbones, register_backbone
from .backbone import PARTS, Backbone, TokenLayout, require
from .vision_transformer import MODEL_SIZES, VisionTransformer
from .local_vit import LocalVisionTransformer
from .hourglass import HourglassTransformer
from .mae import MaskedAutoencoder, random_masking
from .dit import DiT, create_dit
from . import timm_interop  # noqa: E402,F401  (registers everything above with timm; keep last)

__all__ = [
    "Backbone", "DiT", "HourglassTransformer", "LocalVisionTransformer", "MODEL_SIZES", "PARTS", "TokenLayout",
    "require", "MaskedAutoencoder", "VisionTransformer", "create_backbone", "create_dit",
    "describe_backbone", "is_backbone", "list_backbones", "random_masking", "register_backbone",
]
