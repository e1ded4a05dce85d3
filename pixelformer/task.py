"""The task plug-in interface and registry.

A task is one module in ``tasks/`` that subclasses :class:`Task` and decorates it with ``@register_task``. The shared
engine (``pixelformer.engine``) owns Fabric, data loading, optimisation, checkpoints and logging; a task supplies:

* ``config_cls``: the dataclass of its ``task:`` config section;
* ``build_module(cfg, data)``: an ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``"loss"``
  (Fabric wraps only ``forward``, so everything that must run under autocast/DDP happens there);
* ``evaluate(fabric, module, loader, cfg)``: metrics on the test split, reduced over processes;
* optionally ``visualize`` (pictures for the run directory and W&B), ``extra_state`` (e.g. an EMA model saved in
  checkpoints) and ``on_train_step_end`` (e.g. the EMA update).

Adding a task touches no other task: ``tasks/__init__.py`` imports every module in the package.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from torch import nn

from .config import TaskCfg
from .errors import UserError, did_you_mean

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from omegaconf import DictConfig
    from torch.utils.data import DataLoader

    from .data import DataInfo

__all__ = ["Task", "eval_mode", "get_task", "list_tasks", "register_task"]

_TASKS: dict[str, type[Task]] = {}


class Task:
    """Base class of a task plug-in. Subclasses set ``name``, ``config_cls`` and ``monitor``."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskCfg]] = TaskCfg
    #: Metric that selects the ``best`` checkpoint, and whether higher ("max") or lower ("min") is better.
    monitor: ClassVar[tuple[str, str]] = ("test/loss", "min")

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        """The trainable module; ``module(batch)`` returns ``{"loss": tensor, ...}``."""
        raise NotImplementedError

    def evaluate(self, fabric: Fabric, module: nn.Module, loaders: dict[str, DataLoader],
                 cfg: DictConfig) -> dict[str, float]:
        """Metrics, identical on every process. ``loaders["test"]`` is the test split, ``loaders["train"]`` the
        training split without augmentation (for k-NN or probes); both are sharded over processes."""
        raise NotImplementedError

    def visualize(self, fabric: Fabric, module: nn.Module, loaders: dict[str, DataLoader], cfg: DictConfig,
                  out_dir: Path, step: int) -> list[Path]:
        """Write pictures of the model's behaviour into ``out_dir`` (rank 0 only); returns their paths."""
        return []

    def extra_state(self, fabric: Fabric, module: nn.Module) -> dict[str, Any]:
        """Additional objects with ``state_dict()`` to save and restore with the checkpoint (e.g. EMA weights)."""
        return {}

    def on_train_step_end(self, module: nn.Module, step: int) -> None:
        """Called after every optimizer step."""

    def init_from(self, module: nn.Module, path: str) -> dict[str, list[str]]:
        """Initialise from pretrained weights (``init_from=``): by default the encoder, ``module.backbone``."""
        from .checkpoint import load_backbone_weights

        if not isinstance(getattr(module, "backbone", None), nn.Module):
            raise UserError(f"init_from={path}: task {self.name} has no encoder to initialise and does not support "
                            f"init_from; drop it to train from scratch")
        return load_backbone_weights(module.backbone, path)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, drop path or label dropout) for the block, then back in its own mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is registered twice ({_TASKS[cls.name]} and {cls})")
    _TASKS[cls.name] = cls
    return cls


def _import_tasks() -> None:
    importlib.import_module("pixelformer.tasks")


def list_tasks() -> list[str]:
    _import_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    _import_tasks()
    if name not in _TASKS:
        hint = did_you_mean(name, _TASKS)
        raise UserError(f"unknown task {name!r}.{hint} Choices: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()
