"""Loading a saved run, for any purpose: evaluation, sampling, the FID classifier, benchmarks, reports.

    run = load_run("runs/dit-.../checkpoints/last.ckpt", weights="ema")
    cfg, data, task, module = run          # a named tuple; module is on the CPU, in eval mode

The run's config comes from the checkpoint (``overrides`` change it key by key, e.g. ``data.img_size=16``), the
task from the registry, the module from ``task.build_module`` with the checkpoint's weights loaded strictly.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence

from omegaconf import DictConfig
from torch import nn

from .checkpoint import check_state_dict, read_checkpoint
from .config import compose_saved
from .data import DataInfo, build_datasets
from .errors import UserError
from .task import Task, get_task

__all__ = ["LoadedRun", "checkpoint_of", "load_run"]


class LoadedRun(NamedTuple):
    config: DictConfig
    data: DataInfo
    task: Task
    module: nn.Module


def checkpoint_of(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its ``checkpoints/last.ckpt``)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path / "checkpoints" / "last.ckpt"
    return path


def load_run(path: str | os.PathLike, weights: Literal["model", "ema"] = "model", overrides: Sequence[str] = (),
             ckpt: Optional[dict[str, Any]] = None) -> LoadedRun:
    """``(config, data info, task, module)`` of a saved run, the module holding its training (``"model"``) or
    averaged (``"ema"``: the task's ``ema_target`` replaced by the EMA copy) weights, on the CPU, in eval mode.

    ``ckpt``: the checkpoint's contents when the caller has read them already.
    """
    path = checkpoint_of(path)
    if weights not in ("model", "ema"):
        raise UserError(f"weights={weights!r}: choose model (the training weights) or ema (the averaged weights)")
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{path} is not a pixelformer checkpoint (no 'config' and 'model' entries)")
    cfg = compose_saved(ckpt["config"], list(overrides))
    task = get_task(cfg.task.name)
    # The data's shape and normalisation as recorded; rebuilt when an override may change them (or for old files).
    rebuild = "data_info" not in ckpt or any(o.split("=", 1)[0].startswith("data.") for o in overrides)
    info = build_datasets(cfg.data)[2] if rebuild else DataInfo(**ckpt["data_info"])
    module = task.build_module(cfg, info)
    check_state_dict(module, ckpt["model"], str(path))
    module.load_state_dict(ckpt["model"])
    if weights == "ema":
        if task.ema_target is None or not isinstance(ckpt.get("ema"), dict):
            raise UserError(f"{path} holds no EMA weights (task {task.name} keeps none, or the run had no "
                            f"task.ema_decay): use weights=model")
        target = module.get_submodule(task.ema_target)
        check_state_dict(target, ckpt["ema"], f"{path} (ema)")
        target.load_state_dict(ckpt["ema"])
    return LoadedRun(cfg, info, task, module.eval())

