"""Backbone registry: a name -> entrypoint table, filled by the ``@register_backbone`` decorator on import."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable, Union

import torch
from torch import nn

from ..errors import UserError, did_you_mean

__all__ = ["register_backbone", "create_backbone", "list_backbones", "is_backbone", "describe_backbone"]

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
# Called with each newly registered entrypoint (timm_interop registers it with timm as pixelformer_<name>).
_ON_REGISTER: list[Callable[[Callable[..., nn.Module]], None]] = []


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; ``fn(**overrides)`` must return the backbone."""
    name = fn.__name__
    if name in _ENTRYPOINTS:
        warnings.warn(f"Overwriting backbone {name!r} in the registry with {fn.__module__}.{name}", stacklevel=2)
    _ENTRYPOINTS[name] = fn
    for hook in _ON_REGISTER:
        hook(fn)
    return fn


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted registered names matching a shell-style ``pattern`` (e.g. ``"pit_*"``)."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatch(n, pattern))


def is_backbone(name: str) -> bool:
    return name in _ENTRYPOINTS


def create_backbone(name: str, **overrides: Any) -> nn.Module:
    """Build a registered backbone; any architectural default can be overridden by keyword.

    Overrides that are ``None`` are dropped so that the entrypoint's own default applies (config fields left unset
    arrive as ``None``).
    """
    if name not in _ENTRYPOINTS:
        hint = did_you_mean(name, _ENTRYPOINTS)
        raise UserError(f"Unknown backbone {name!r}.{hint} Registered: {', '.join(list_backbones())}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return _ENTRYPOINTS[name](**overrides)


def _side(size: Any) -> int:
    return int(size if isinstance(size, int) else size[0])


def describe_backbone(model_or_name: Union[str, nn.Module], **overrides: Any) -> dict[str, Any]:
    """The architecture of a backbone, read off the model: a registered name is built on the meta device (no memory,
    no init) with ``overrides``; a model is read as it is.

    Returns ``depth``, ``embed_dim``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``norm_eps``, ``patch_size``,
    ``img_size``, ``in_chans``, ``grid_size``, ``num_patches``, ``num_prefix_tokens``, ``tokens`` (prefix + patches),
    ``pos_embed`` (``learned`` / ``sincos`` / ``none``), ``global_pool`` and ``num_params``. Works for any backbone
    with timm's ViT layout (``patch_embed``, ``blocks`` with ``attn`` and ``mlp``, ``embed_dim``), and for the DiT
    denoiser (``x_embedder`` in place of ``patch_embed``).
    """
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_backbone(model_or_name, **overrides)
        name = model_or_name
    else:
        if overrides:
            raise TypeError("overrides apply to a registered name, not to a built model")
        model, name = model_or_name, type(model_or_name).__name__
    embed, blocks = getattr(model, "patch_embed", None) or model.x_embedder, model.blocks
    width = int(getattr(model, "embed_dim", 0) or embed.proj.out_channels)
    first = blocks[0] if len(blocks) else None
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    pos = getattr(model, "pos_embed_kind", None)
    if pos is None:  # a model of another class: a parameter is learned, a buffer a fixed table
        table = getattr(model, "pos_embed", None)
        pos = "none" if table is None else "learned" if isinstance(table, nn.Parameter) else "sincos"
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    in_chans = getattr(embed, "in_chans", None)
    if in_chans is None:
        in_chans = embed.proj.in_channels
    return dict(
        name=name, depth=len(blocks), embed_dim=width,
        num_heads=int(first.attn.num_heads) if first is not None else 0,
        mlp_ratio=first.mlp.fc1.out_features / width if first is not None else 0.0,
        qkv_bias=bool(first is not None and first.attn.qkv.bias is not None),
        norm_eps=float(norms[0].eps) if norms else None,
        patch_size=_side(embed.patch_size), img_size=_side(embed.img_size), in_chans=int(in_chans),
        grid_size=_side(embed.grid_size), num_patches=int(embed.num_patches), num_prefix_tokens=num_prefix,
        tokens=int(embed.num_patches) + num_prefix, pos_embed=pos, global_pool=getattr(model, "global_pool", None),
        num_params=sum(p.numel() for p in model.parameters()),
    )
