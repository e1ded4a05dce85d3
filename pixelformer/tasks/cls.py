"""Image classification with a pixel (or patch) transformer: training from scratch or fine-tuning."""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pixelformer.data import DataInfo
from pixelformer.task import EvalContext, Task, TaskCfg, build_backbone, register_task


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

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        return Classifier(build_backbone(cfg, data, num_classes=data.num_classes), cfg.task.label_smoothing)

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        totals = torch.zeros(4, device=ctx.fabric.device, dtype=torch.float64)  # loss sum, top-1, top-5, count
        for batch in ctx.loaders["test"]:
            out = module(batch)
            logits, labels = out["logits"].float(), batch[1]
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += (topk[:, 0] == labels).sum()
            totals[2] += (topk == labels[:, None]).any(dim=1).sum()
            totals[3] += labels.numel()
        totals = ctx.fabric.all_reduce(totals, reduce_op="sum")
        count = totals[3].clamp(min=1)
        return {"test/loss": (totals[0] / count).item(), "test/acc1": (100 * totals[1] / count).item(),
                "test/acc5": (100 * totals[2] / count).item()}
