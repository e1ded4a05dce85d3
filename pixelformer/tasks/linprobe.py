"""Linear probing (MAE's protocol): a frozen pretrained backbone, a linear classifier trained on its pooled feature.

``task=linprobe init_from=<mae or cls checkpoint>`` measures how linearly separable a backbone's features are, next
to MAE's k-NN. As in MAE's ``main_linprobe.py``:

* every backbone parameter is frozen (``requires_grad=False``) and the backbone stays in eval mode even while the
  probe trains, so dropout and drop path are off and the features of an image never change;
* the head reads the backbone's pooled feature: the CLS token after the final norm (``model.pool=cls``), or the
  mean of the normalised tokens (``model.pool=mean``), which is also the feature MAE's k-NN here scores. The
  backbone is built without ``fc_norm`` unless the config asks for it (``model.fc_norm=true``, e.g. for a ``cls``
  checkpoint trained with it), so the checkpoint's own final norm is kept rather than replaced by a fresh one;
* the head is ``BatchNorm1d(affine=False, eps=1e-6)`` then ``Linear``, with the weights drawn from a truncated
  normal of std 0.01 and zero bias. The batch norm standardises each feature dimension (MAE's paper found its
  un-normalised features probe better that way) and has no parameters of its own, so the probe stays a linear
  classifier: at evaluation it is a fixed affine map that could be folded into the linear layer.

Without ``init_from`` the backbone is probed at its random initialisation: a meaningful baseline (MAE's papers
report it), allowed with a warning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig
from timm.layers import trunc_normal_
from torch import nn

from pixelformer.data import DataInfo
from pixelformer.errors import UserError
from pixelformer.task import (EvalContext, Task, TaskCfg, build_backbone, evaluate_classifier, register_task,
                              save_confusion_matrix)


@dataclass
class LinProbeTaskCfg(TaskCfg):
    name: str = "linprobe"


class LinearProbe(nn.Module):
    """A frozen backbone and a trainable ``BatchNorm1d(affine=False)`` + ``Linear`` head on its pooled feature.

    ``forward(batch)`` takes images (B, C, H, W) and labels (B,) and returns the cross-entropy ``"loss"`` and the
    ``"logits"`` (B, num_classes).
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        dim = backbone.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)  # MAE's probe: small weights, so the first logits are ~ equal
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        """Train the head only: the backbone stays in eval mode (no dropout or drop path in the features)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature (B, num_features); no autograd graph is kept, as nothing in it trains."""
        with torch.no_grad():
            return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.head(self.features(images))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


@register_task
class LinearProbeTask(Task):
    name = "linprobe"
    config_cls = LinProbeTaskCfg
    monitored = ("test/acc1", "max")

    def check(self, cfg: DictConfig, data: DataInfo) -> None:
        if not cfg.init_from:
            rank_zero_warn("task=linprobe without init_from probes a frozen, randomly initialised backbone (the "
                           "random-init baseline); pass init_from=<mae or cls checkpoint> to probe trained features")

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        # fc_norm off unless asked for: the pooled feature is then normalised by the checkpoint's own final norm,
        # as in MAE's encoder, rather than by a fresh fc_norm that would stay frozen at its initialisation.
        return LinearProbe(build_backbone(cfg, data, num_classes=0, fc_norm=False), data.num_classes)

    def init_from(self, module: nn.Module, path: str) -> dict[str, list[str]]:
        """The checkpoint's encoder into the frozen backbone (``Task.init_from``); refuses to freeze a pooling
        layer that the checkpoint does not hold, which would stay at its random initialisation."""
        report = super().init_from(module, path)
        if any(key.startswith("attn_pool.") for key in report["reinitialised"]):
            raise UserError(f"init_from={path} holds no attention pool for model.global_pool=map, and the frozen "
                            f"probe would read a random one: set model.pool=cls or model.pool=mean (the pooling the "
                            f"encoder was trained with)")
        module.backbone.requires_grad_(False)  # whatever loading re-created stays frozen too
        return report

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        return evaluate_classifier(module, ctx)

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """``confusion_matrix.png``: the test confusion matrix of the evaluation just run."""
        path = save_confusion_matrix(ctx.details, out_dir / "confusion_matrix.png")
        return [path] if path is not None else []
