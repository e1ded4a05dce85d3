"""Checkpoints: plain containers written atomically, read with ``weights_only=True``, checked before loading.

A checkpoint is one ``torch.save`` file holding state dicts (model, optimizer, scheduler, task extras such as EMA),
progress counters, RNG states as tensors and the run config as a plain dict, so ``torch.load(path,
weights_only=True)`` reads it: loading a checkpoint never runs code.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

# Training checkpoints of format 1 were written while build_sincos_2d_pos_embed had rows and columns swapped; the
# table itself is never saved, so only the format tells such a checkpoint apart.
TRANSPOSED_SINCOS_FORMAT = "pixelformer-checkpoint/1"
from .layers.pos_embed import SINCOS_ATOL, is_sincos_table

__all__ = [
    "capture_rng_state", "check_state_dict", "fsync_and_replace", "load_backbone_weights", "read_checkpoint",
    "restore_rng_state",
]


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
        raise CheckpointError(_load_failure(path, e)) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict of state")
    if ckpt.get("format") == TRANSPOSED_SINCOS_FORMAT:
        warnings.warn(f"{path} was written before the fixed sin-cos position table took MAE's and DiT's layout "
                      f"(checkpoint format 1): a model with sin-cos positions (pit_mini / vit_mini, model.pos_embed="
                      f"sincos, every MAE decoder and DiT denoiser) now sees its positions transposed; retrain it "
                      f"(learned tables are unaffected)", stacklevel=2)
    return ckpt


def _load_failure(path: Path, error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``path``, with torch's own detail.

    torch's message for a disallowed global spans many lines and suggests ``weights_only=False``, which would run the
    file's code; only the name of the global is kept.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch bolds part of its message with terminal codes
    # "Unsupported global: GLOBAL m.f" (not allow-listed), or "unsupported GLOBAL m.f whose module m is blocked"
    found = re.search(r"Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+ whose module [\w.]+ is blocked"
                      r"|GLOBAL [\w.]+", text)
    if found:
        return (f"cannot read checkpoint {path}: it stores a Python object ({found.group(0)}), and checkpoints are "
                f"read weights-only (tensors and plain containers) so that no code in a file ever runs: use one "
                f"written by tools/train.py, or re-save a trusted file's state dict with plain types")
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = detail.group(1).strip() if detail else (lines[0] if lines else "")
    return (f"cannot read checkpoint {path}: it is truncated, corrupted or not a torch checkpoint of plain data "
            f"({type(error).__name__}{': ' + reason[:200] if reason else ''})")


def check_state_dict(module: nn.Module, saved: Mapping[str, torch.Tensor], source: str,
                     resizable: tuple[str, ...] = ("pos_embed",),
                     expected: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Raise a :class:`CheckpointError` listing missing, unexpected and mis-shaped keys, if there are any.

    Keys ending in one of ``resizable`` may differ in shape (the model resizes them on load). A saved copy of a table
    the model computes itself (a non-persistent buffer such as a sin-cos ``pos_embed``) passes when it equals the
    model's and is an error naming the key when it differs; the models' load hooks apply the same rule.

    ``expected``: the module's state dict (its shapes are what matters, so meta tensors do), when
    ``module.state_dict()`` would not give the full one (an FSDP-wrapped module holds shards).
    """
    expected = module.state_dict() if expected is None else expected
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(saved))
        if hasattr(saved[k], "shape") and saved[k].shape != expected[k].shape and not k.endswith(resizable)
    ]
    tables = []
    for key in list(unexpected):
        own = _fixed_buffer(module, key)
        if own is None:
            continue
        unexpected.remove(key)
        value = saved[key]
        if value.shape != own.shape or not torch.allclose(value.detach().float().cpu(), own.detach().float().cpu(),
                                                          atol=SINCOS_ATOL, rtol=0):
            tables.append(f"{key}: the checkpoint holds a position table {tuple(value.shape)} that differs from "
                          f"this model's fixed sin-cos table {tuple(own.shape)}: set model.pos_embed=learned to load "
                          f"it")
    if not (missing or unexpected or mismatched or tables):
        return

    def show(title: str, items: list[str]) -> str:
        more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + more if items else ""

    def final_norm(keys: list[str]) -> bool:
        return any(k == "norm.weight" or k.endswith(".norm.weight") for k in keys)

    hints = []
    if any(k.endswith("fc_norm.weight") for k in missing) and final_norm(unexpected):
        hints.append("The checkpoint normalises every token before pooling (pool=mean before model.fc_norm existed, "
                     "or model.fc_norm=false): pass model.fc_norm=false.")
    if final_norm(missing) and any(k.endswith("fc_norm.weight") for k in unexpected):
        hints.append("The checkpoint normalises after pooling (model.fc_norm=true): pass model.fc_norm=true.")
    raise CheckpointError(
        f"checkpoint {source} does not match the model (another architecture or config?)"
        + "".join(f"\n  {t}" for t in tables)
        + show("shape mismatches", mismatched) + show("missing in checkpoint", missing)
        + show("unexpected in checkpoint", unexpected)
        + "".join(f"\n  {h}" for h in hints)
        + "\n  Build the model with the checkpoint's config (tools/eval.py reads it from the checkpoint)."
    )


def _fixed_buffer(module: nn.Module, key: str) -> torch.Tensor | None:
    """The non-persistent buffer that ``key`` names in ``module`` (a table it computes itself), or None."""
    path, _, name = key.rpartition(".")
    try:
        owner = module.get_submodule(path) if path else module
    except AttributeError:
        return None
    if name in getattr(owner, "_non_persistent_buffers_set", ()):
        return getattr(owner, name, None)
    return None


def capture_rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """Every RNG this process draws from, as tensors and plain Python values (``weights_only``-safe): torch's CPU
    stream, Python's, numpy's, and the stream of this process's own CUDA ``device`` (not every device's: another
    process owns those)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if device is not None and torch.device(device).type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: Optional[torch.device] = None) -> None:
    """Restore what :func:`capture_rng_state` captured. Checkpoints written before per-process states kept
    ``cuda`` (every device's stream, from rank 0's process): restored on this process's device alone."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif "cuda" in state:
        index = torch.device(device).index or 0
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index], device)


# --------------------------------------------------------------------------------------- pretrained weights
# Keys that a pretraining checkpoint may hold besides the encoder, and that fine-tuning drops on purpose.
_DROPPED_PREFIXES = ("decoder_", "mask_token", "decoder.", "head.")
_BACKBONE_ROOTS = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "blocks.", "norm.", "fc_norm.",
                   "attn_pool.")


def _state_dict_of(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def _backbone_prefix(state: Mapping[str, Any], backbone_keys: set[str]) -> str:
    """The key prefix under which ``state`` stores the backbone: the candidate that matches most keys."""
    candidates = {""}
    for key in state:
        for root in _BACKBONE_ROOTS:
            at = key.find(root)
            if at >= 0 and key[at:] in backbone_keys:
                candidates.add(key[:at])
    return max(sorted(candidates), key=lambda p: sum(1 for k in backbone_keys if p + k in state))


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Initialise ``backbone`` from a checkpoint's encoder weights and report what happened.

    Accepts pixelformer checkpoints of any task (the encoder is found under its prefix, e.g. ``backbone.`` or
    ``model.encoder.``), the reference MAE format (``{"model": state_dict}`` with timm ViT names) and timm state
    dicts. Decoder weights, the mask token and a head whose shape does not fit are dropped; a learned position
    embedding of another grid is resized. A position table saved for a model that computes its own (sin-cos) must
    equal that table, at the checkpoint's grid. A final ``norm`` gives way to a fresh ``fc_norm`` when the model
    pools before normalising (MAE's fine-tuning with global pooling). Anything else that does not fit is an error
    naming the keys, never a silent ``strict=False``.

    Returns:
        ``{"loaded": [...], "dropped": [...], "reinitialised": [...], "matched_fixed": [...]}``; keys relative to the
        backbone. ``matched_fixed``: saved tables equal to the model's fixed one (kept, not loaded).
    """
    ckpt = read_checkpoint(path)
    state = _state_dict_of(ckpt)
    expected = backbone.state_dict()
    prefix = _backbone_prefix(state, set(expected))
    found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    loaded, dropped, matched_fixed, problems = {}, [], [], []
    # MAE fine-tuning with global pooling: the pretrained encoder's final norm is dropped and fc_norm starts fresh.
    norm_to_fc_norm = ("fc_norm.weight" in expected and "norm.weight" not in expected and "norm.weight" in found
                       and "fc_norm.weight" not in found)
    for key, value in found.items():
        if key in expected and (value.shape == expected[key].shape or key == "pos_embed"):
            loaded[key] = value
        elif key == "pos_embed":  # the model computes its table (sincos) or has none
            problem = _fixed_table_problem(backbone, value, 1 if "cls_token" in found else 0)
            if problem:
                problems.append(problem)
            else:
                matched_fixed.append(key)
        elif norm_to_fc_norm and key.startswith("norm."):
            dropped.append(key)
        elif key.startswith("fc_norm.") and key not in expected:
            if key == "fc_norm.weight":  # one line for the pair
                problems.append("fc_norm: the checkpoint normalises after pooling (timm's global_pool='avg', MAE's "
                                "fine-tuned models): set model.pool=mean (or model.fc_norm=true)")
        elif key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)  # decoder / mask token / unfit head
        elif key in expected:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}")
        elif key.startswith(_BACKBONE_ROOTS):
            problems.append(f"{key}: in the checkpoint's encoder but not in the model")
        else:
            dropped.append(key)
    # Keys beside the encoder (an MAE decoder next to "model.encoder.") are reported relative to their parent.
    parent = prefix[: prefix[:-1].rfind(".") + 1] if prefix else ""
    dropped += [k[len(parent):] if k.startswith(parent) else k for k in state if not k.startswith(prefix)]
    reinitialised = sorted(k for k in expected if k not in loaded)
    # The pooling head starts fresh in fine-tuning: the classifier, and attention pooling (global_pool=map).
    fresh = ("head.", "attn_pool.", "fc_norm.") if norm_to_fc_norm else ("head.", "attn_pool.")
    problems += [f"{k}: in the model but not in the checkpoint" for k in reinitialised if not k.startswith(fresh)]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"{path} does not fit the model's backbone (encoder keys found under prefix {prefix!r}):\n  "
            + "\n  ".join(problems[:10]) + more
            + "\n  Configure the model like the pretrained encoder (model.depth, model.embed_dim, model.patch_size, "
              "model.pos_embed, model.pool / class_token / fc_norm)."
        )
    backbone.load_state_dict(loaded, strict=False)
    if any(k.startswith("head.") for k in reinitialised) and hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(backbone.num_classes)  # MAE fine-tuning: a fresh head with a tiny init
    return {"loaded": sorted(loaded), "dropped": sorted(dropped), "reinitialised": reinitialised,
            "matched_fixed": sorted(matched_fixed)}


def _fixed_table_problem(backbone: nn.Module, table: torch.Tensor, num_prefix_tokens: int) -> str | None:
    """Why a checkpoint's position table cannot go into a model without a learned one; None when it fits.

    It fits a sin-cos model when it is the sin-cos table of its own grid (the model computes the same at any grid),
    and a model without positions only when it is all zeros.
    """
    sincos = is_sincos_table(table, num_prefix_tokens)
    if getattr(backbone, "pos_embed", None) is not None:
        if sincos:
            return None
        return ("pos_embed: the checkpoint's position table is not the fixed sin-cos table this model computes "
                "(model.pos_embed=sincos): set model.pos_embed=learned to load it")
    if not sincos and not table.any():
        return None
    return (f"pos_embed: the checkpoint has a {'fixed sin-cos' if sincos else 'learned'} position table but the "
            f"model has none (model.pos_embed=none): set model.pos_embed={'sincos' if sincos else 'learned'}")
