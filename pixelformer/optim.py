"""Optimizer with the usual weight-decay exclusions, and a step-based warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["build_optimizer", "build_scheduler", "param_groups"]


def param_groups(module: nn.Module, weight_decay: float, layer_decay: Optional[float] = None) -> list[dict]:
    """Parameter groups: no weight decay on biases, norms and the embeddings named by ``no_weight_decay()``;
    with ``layer_decay``, one lr scale per depth of the backbone (found as the submodule with ``layer_id``)."""
    skip: set[str] = set()
    backbone_prefix, backbone = None, None
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            skip |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
        if hasattr(sub, "layer_id") and backbone is None:
            backbone_prefix, backbone = (prefix + "." if prefix else ""), sub
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if layer_decay is not None and backbone is not None and name.startswith(backbone_prefix):
            num_layers = len(backbone.blocks) + 1
            scale = layer_decay ** (num_layers - backbone.layer_id(name[len(backbone_prefix):]))
        decayed = not (param.ndim <= 1 or name in skip)
        groups.setdefault((decayed, scale), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr_scale": scale}
            for (decayed, scale), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], not kv[0][0]))]


def build_optimizer(module: nn.Module, cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(module, cfg.weight_decay, cfg.layer_decay)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_scale"]  # the schedule scales each group's own base lr
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    # The fused kernel exists for CUDA and CPU in current torch; None picks it where the device supports it.
    fused = cfg.fused if cfg.fused is not None else device.type in ("cuda", "cpu")
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
