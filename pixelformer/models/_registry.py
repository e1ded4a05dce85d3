"""Backbone registry: a name -> entrypoint table, filled by the ``@register_backbone`` decorator on import."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Any, Callable

from torch import nn

from ..errors import UserError, did_you_mean

__all__ = ["register_backbone", "create_backbone", "list_backbones", "is_backbone"]

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; ``fn(**overrides)`` must return the backbone."""
    name = fn.__name__
    if name in _ENTRYPOINTS:
        warnings.warn(f"Overwriting backbone {name!r} in the registry with {fn.__module__}.{name}", stacklevel=2)
    _ENTRYPOINTS[name] = fn
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
