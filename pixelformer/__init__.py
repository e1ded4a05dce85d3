"""pixelformer: transformers on individual pixels, for classification, MAE pretraining and DiT diffusion.

The Python API, the same runs as the console commands (``pixelformer-train ARGS`` is ``fit(compose(ARGS))``)::

    import pixelformer
    cfg = pixelformer.compose(["task=mae", "model=pit_tiny", "trainer.max_steps=100", "run.dir=runs/mae"])
    metrics = pixelformer.fit(cfg)              # trains, writes runs/mae/ (checkpoints, eval.json), returns metrics
    run = pixelformer.load_run("runs/mae")      # a finished run's model and config (pixelformer/saved.py)

``fit`` and ``load_run`` are imported on first use, so that ``import pixelformer`` does not load the trainer.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterable

from .errors import CheckpointError, UserError
from .models import create_backbone, list_backbones  # also registers the backbones with timm (pixelformer_*)

__version__ = "0.1.0"

# name -> (module, attribute), imported when first used
_LAZY = {"fit": ("engine", "fit"), "load_run": ("saved", "load_run")}

__all__ = ["CheckpointError", "UserError", "compose", "create_backbone", "fit", "list_backbones", "load_run",
           "__version__"]


def compose(overrides: Iterable[str] = ()) -> Any:
    """The config that ``pixelformer-train *overrides`` trains, as an omegaconf ``DictConfig``.

    ``overrides`` are the command line's ``group=choice`` and ``key=value`` strings over the packaged YAML configs
    (``pixelformer/configs/``). As on the command line, a run being resumed (``run.dir=X resume=auto`` with a
    checkpoint there, or ``resume=PATH``) starts from the run's saved config and ``overrides`` change only the keys
    they name (:func:`pixelformer.run.compose_for_resume`); without one this is
    :func:`pixelformer.config.compose`. Raises :class:`UserError` for an unknown group, choice or key.
    """
    from .run import compose_for_resume

    return compose_for_resume([overrides] if isinstance(overrides, str) else list(overrides))


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module_name}":
            raise
        raise AttributeError(f"{__name__}.{name} is not available in this version: {__name__}/{module_name}.py "
                             f"is missing") from None
    value = getattr(module, attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
