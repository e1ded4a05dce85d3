"""Checkpoints: plain containers written atomically, read with ``weights_only=True``, checked before loading.

A checkpoint is one ``torch.save`` file holding state dicts (model, optimizer, scheduler, task extras such as EMA),
progress counters, RNG states as tensors and the run config as a plain dict, so ``torch.load(path,
weights_only=True)`` reads it: loading a checkpoint never runs code.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["capture_rng_state", "check_state_dict", "read_checkpoint", "restore_rng_state", "fsync_and_replace"]


def fsync_and_replace(tmp: Path, final: Path) -> None:
    """Make ``tmp`` durable, then atomically rename it over ``final``: a reader sees the old file or the new one."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    try:  # persist the rename itself
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on CPU with ``weights_only=True``; any failure becomes a :class:`CheckpointError`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (run directories keep them in "
                              f"<run.dir>/checkpoints/last.ckpt and best.ckpt)")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory: pass the .ckpt file inside it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated, corrupted or not a torch checkpoint of plain data "
            f"({type(e).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict of state")
    return ckpt


def check_state_dict(module: nn.Module, saved: Mapping[str, torch.Tensor], source: str,
                     resizable: tuple[str, ...] = ("pos_embed",)) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped keys, if there are any.

    Keys ending in one of ``resizable`` may differ in shape (the model resizes them on load).
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(saved))
        if hasattr(saved[k], "shape") and saved[k].shape != expected[k].shape and not k.endswith(resizable)
    ]
    if not (missing or unexpected or mismatched):
        return

    def show(title: str, items: list[str]) -> str:
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more if items else ""

    raise CheckpointError(
        f"checkpoint {source} does not match the model (another architecture or config?)"
        + show("shape mismatches", mismatched) + show("missing in checkpoint", missing)
        + show("unexpected in checkpoint", unexpected)
        + "\n  Build the model with the checkpoint's config (tools/eval.py reads it from the checkpoint)."
    )


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, as tensors and plain Python values (``weights_only``-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
