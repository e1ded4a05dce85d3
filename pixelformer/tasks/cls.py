"""Image classification with a pixel (or patch) transformer: training from scratch or fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pixelformer.data import DataInfo
from pixelformer.task import (EvalContext, Task, TaskCfg, build_backbone, evaluate_classifier, register_task,
                              save_confusion_matrix)


@dataclass
class ClsTaskCfg(TaskCfg):
    name: str = "cls"
    label_smoothing: float = 0.0


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
    monitored = ("test/acc1", "max")
    recipe_levers = ("token_drop", "low_res")  # the classifier takes any image size its backbone is set to

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        return Classifier(build_backbone(cfg, data, num_classes=data.num_classes), cfg.task.label_smoothing)

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        return evaluate_classifier(module, ctx)

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """``confusion_matrix.png``: the test confusion matrix of the evaluation just run."""
        path = save_confusion_matrix(ctx.details, out_dir / "confusion_matrix.png")
        return [path] if path is not None else []
