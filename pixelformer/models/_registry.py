"""Backbone registry: a name -> entrypoint table, filled by the ``@register_backbone`` decorator on import."""
from __future__ import annotations

import fnmatch
import re
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
    try:
        return _ENTRYPOINTS[name](**overrides)
    except TypeError as e:  # a keyword of another family (model.kernel on a global pit): the user's, named
        match = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if match is None:
            raise
        raise UserError(f"model.{match.group(1)} does not apply to {name}; remove it (it belongs to other "
                        f"families: see `python tools/train.py --help`)") from None


def describe_backbone(model_or_name: Union[str, nn.Module], flops: bool = False, **overrides: Any) -> dict[str, Any]:
    """The architecture of a backbone, read off the model through the backbone contract
    (:func:`pixelformer.models.backbone.describe`): a registered name is built on the meta device (no memory, no
    init) with ``overrides``; a model is read as it is. ``flops``: also the forward GFLOPs of one image.
    """
    from .backbone import describe

    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_backbone(model_or_name, **overrides)
    else:
        if overrides:
            raise TypeError("overrides apply to a registered name, not to a built model")
        model = model_or_name
    if not callable(getattr(model, "token_layout", None)):
        raise TypeError(f"{type(model).__name__} does not implement the backbone contract (token_layout, "
                        f"condition_blocks, ...: pixelformer/models/backbone.py)")
    info = describe(model, flops)
    if isinstance(model_or_name, str):
        info["name"] = model_or_name
    return info
