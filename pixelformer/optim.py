"""Optimizer with the usual weight-decay exclusions, and a step-based warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from .errors import UserError

__all__ = ["build_optimizer", "build_scheduler", "param_groups"]


def _backbone_of(module: nn.Module) -> tuple[str, Optional[nn.Module]]:
    """The first submodule with timm's ``group_matcher`` (the backbone inside a task module) and its key prefix."""
    for prefix, sub in module.named_modules():
        if hasattr(sub, "group_matcher"):
            return (prefix + "." if prefix else ""), sub
    return "", None


def param_groups(module: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """Parameter groups: no weight decay on biases, norms and the embeddings named by ``no_weight_decay()``;
    with ``layer_decay``, one lr scale per depth of the backbone (the submodule with timm's ``group_matcher``).

    timm decides each parameter's (decay, lr scale): ``param_groups_weight_decay`` on the task module and
    ``param_groups_layer_decay`` on its backbone. By hand, because timm reads ``no_weight_decay`` / ``group_matcher``
    of the top module only and the task modules wrap the backbone: the exclusions of every submodule are collected
    under their prefixes, parameters outside the backbone (an MAE decoder) keep the full lr, and the groups keep the
    order and membership that saved optimizer states (resume) were written with.
    """
    skip: set[str] = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    # A placeholder decay of 1 so that timm splits decayed / not even when weight_decay is 0 (same groups either way).
    decayed: dict[int, bool] = {}
    for group in param_groups_weight_decay(module, 1.0, no_weight_decay_list=sorted(skip)):
        decayed.update({id(p): group["weight_decay"] > 0 for p in group["params"]})
    scales: dict[int, float] = {}
    backbone_prefix, backbone = _backbone_of(module)
    if layer_decay is not None and backbone is not None:
        for group in param_groups_layer_decay(backbone, 1.0, layer_decay=layer_decay,
                                              no_weight_decay_list=sorted(backbone.no_weight_decay())):
            scales.update({id(p): group["lr_scale"] for p in group["params"]})
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            groups.setdefault((decayed[id(param)], scales.get(id(param), 1.0)), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if is_decayed else 0.0, "lr_scale": scale}
            for (is_decayed, scale), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], not kv[0][0]))]


def build_optimizer(module: nn.Module, cfg: DictConfig, device: torch.device,
                    fused_allowed: bool = True) -> torch.optim.Optimizer:
    """The configured optimizer over ``module``'s parameter groups (weight decay, layer decay).

    ``fused_allowed=False`` (FSDP with 16-mixed: torch's fused AdamW cannot take the sharded gradient scaler's
    inf flag) keeps AdamW unfused, and refuses ``optim.fused=true``."""
    if cfg.fused and not fused_allowed:
        raise UserError("optim.fused=true cannot run under trainer.strategy=fsdp with trainer.precision=16-mixed "
                        "(torch's fused AdamW does not take FSDP's sharded gradient scaler): set optim.fused=null "
                        "or trainer.precision=bf16-mixed")
    groups = param_groups(module, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]  # the schedule scales each group's own base lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.name == "lars":
        # MAE's LARS adapts (update scaled by 0.001 * |w| / |g|, timm's trust_coeff) the weight matrices only, also
        # without weight decay (its linear probe has none); timm's adapts a group only when its weight decay is set
        # or always_adapt is, so always_adapt marks the group of matrices (timm never decays 1-D parameters).
        for group in groups:
            group["always_adapt"] = all(p.ndim > 1 for p in group["params"])
        return Lars(groups, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernel exists for CUDA and CPU in current torch; None picks it where the device supports it.
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu") and fused_allowed
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, total_steps: int,
                    steps_per_epoch: int) -> LambdaLR:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``min_lr`` at ``total_steps`` (or constant)."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
