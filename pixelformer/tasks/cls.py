"""Image classification with a pixel (or patch) transformer: training from scratch or fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from pixelformer.config import TaskCfg
from pixelformer.data import DataInfo
from pixelformer.models import create_backbone
from pixelformer.task import Task, register_task
from pixelformer.errors import UserError


@dataclass
class ClsTaskCfg(TaskCfg):
    name: str = "cls"
    label_smoothing: float = 0.0


def build_backbone(cfg: DictConfig, data: DataInfo, num_classes: int = 0, **defaults: Any) -> nn.Module:
    """The configured backbone sized for ``data``; model errors (e.g. a size the patches cannot tile) are the user's.

    ``defaults`` replace the registered defaults of model keys that the config leaves unset (``None``).
    """
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    overrides.update({k: v for k, v in defaults.items() if overrides.get(k) is None})
    try:
        model = create_backbone(cfg.model.name, img_size=data.img_size, in_chans=data.in_chans,
                                num_classes=num_classes, **overrides)
    except ValueError as e:
        raise UserError(f"cannot build model {cfg.model.name} for {data.name} "
                        f"({data.img_size}x{data.img_size}x{data.in_chans}): {e}") from None
    if isinstance(getattr(model, "pretrained_cfg", None), dict):  # timm's data config: the data's normalisation
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(data.mean), "std": tuple(data.std)}
        model.default_cfg = model.pretrained_cfg
    return model


class Classifier(nn.Module):
    """Backbone with a linear head; ``forward(batch)`` returns the loss and the logits."""

    def __init__(self, backbone: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.label_smoothing = label_smoothing

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.backbone(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing if self.training else 0.0)
        return {"loss": loss, "logits": logits}


@register_task
class ClassificationTask(Task):
    name = "cls"
    config_cls = ClsTaskCfg
    monitor = ("test/acc1", "max")

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        return Classifier(build_backbone(cfg, data, num_classes=data.num_classes), cfg.task.label_smoothing)

    def evaluate(self, fabric: Fabric, module: nn.Module, loaders: dict[str, DataLoader],
                 cfg: DictConfig) -> dict[str, float]:
        totals = torch.zeros(4, device=fabric.device, dtype=torch.float64)  # loss sum, top-1, top-5, count
        for batch in loaders["test"]:
            out = module(batch)
            logits, labels = out["logits"].float(), batch[1]
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (topk[:, 0] == labels).sum()
            totals[2] += (topk == labels[:, None]).any(dim=1).sum()
            totals[3] += labels.numel()
        totals = fabric.all_reduce(totals, reduce_op="sum")
        count = totals[3].clamp(min=1)
        return {"test/loss": (totals[0] / count).item(), "test/acc1": (100 * totals[1] / count).item(),
                "test/acc5": (100 * totals[2] / count).item()}
