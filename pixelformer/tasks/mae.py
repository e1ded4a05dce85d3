"""Masked-autoencoder pretraining on pixel tokens, evaluated by reconstruction loss and k-NN accuracy.

``norm_pix_loss`` (MAE's per-patch normalised target) is off by default here. It normalises each target token by
the mean and variance of its own p*p*C values; with 1x1 patches that is C values per token: for greyscale (C=1) the
target would be identically zero, and for RGB it keeps only the colour's deviation from its own grey level. So it
is refused for single-value tokens and not advised for pixels; it stays useful for patches (ViT, p >= 2).
"""
from __future__ import annotations

import math
import warnings
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from pixelformer.data import DataInfo, to_unit_interval
from pixelformer.errors import UserError
from pixelformer.models import MaskedAutoencoder
from pixelformer.task import (EvalContext, Task, TaskCfg, build_backbone, eval_mode, mean_loss, register_task,
                              save_image_grid, untrained_baseline)


@dataclass
class MAETaskCfg(TaskCfg):
    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False  # see the module docstring: not meaningful for 1x1 patches
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_random_baseline: bool = True  # also report k-NN accuracy of the same encoder at random initialisation
    num_vis: int = 8  # test images in the reconstruction picture


def build_encoder(cfg: DictConfig, data: DataInfo) -> nn.Module:
    """The encoder to pretrain. MAE's pretraining encoder ends with a norm on every token whatever the pooling, so
    ``model.fc_norm`` defaults to false here (fine-tuning with ``pool=mean`` then drops that norm and starts a fresh
    ``fc_norm``, MAE's recipe)."""
    return build_backbone(cfg, data, num_classes=0, fc_norm=False)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked tokens only: (B, N, P) predictions and targets, (B, N) mask with 1 = masked."""
    per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


class MAEObjective(nn.Module):
    """``forward(batch)`` masks, encodes, decodes and returns the reconstruction loss on masked tokens."""

    def __init__(self, model: MaskedAutoencoder, mask_ratio: float, norm_pix_loss: bool) -> None:
        super().__init__()
        self.model = model
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decode_frac = 1.0  # the share of masked tokens decoded in training: 1 - the recipe's token drop

    def set_token_drop(self, rate: float) -> None:
        """The recipe's token drop, taken in the decoder: masking already keeps the encoder to 1 - mask_ratio of
        the tokens, and the decoder, which sees every token, costs most of a pixel MAE's step (``pit_mini`` at 28x28:
        8x the encoder's FLOPs). So ``rate`` of the masked tokens are not reconstructed in a training step."""
        if not 0 <= rate < 1:
            raise ValueError(f"token drop rate must be in [0, 1), got {rate}")
        self.decode_frac = 1.0 - rate

    @property
    def backbone(self) -> nn.Module:
        """The encoder being pretrained (saved as ``model.encoder.*``, MAE's layout)."""
        return self.model.encoder

    def target(self, images: torch.Tensor) -> torch.Tensor:
        target = self.model.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, _ = batch
        pred, mask = self.model(images, self.mask_ratio, self.decode_frac if self.training else 1.0)
        return {"loss": masked_mse(pred, self.target(images), mask), "pred": pred, "mask": mask}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's :func:`pooled_features` of ``images``. Called through the set-up module (the task marks it
        a forward method), so that FSDP gathers the encoder's parameters as for ``forward``."""
        return pooled_features(self.backbone, images)


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pooled (and ``fc_norm``-ed, where the encoder has one), L2-normalised float32 features (B, D) of images."""
    tokens = encoder.forward_features(images)
    return F.normalize(encoder.forward_head(tokens, pre_logits=True).float(), dim=-1)


def encoder_features(fabric: Fabric, encoder: nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pooled_features` (N, D) and labels (N,) of a whole (sharded) split, gathered on every process. The
    encoder sees one loader batch at a time; only the (N, D) features are kept.

    ``encoder``: an encoder, or a module with a ``features(images)`` method (:class:`MAEObjective` as Fabric set it
    up, whose calls go through its wrapper: FSDP gathers the parameters there)."""
    dtype = next(encoder.parameters()).dtype  # bf16-true converts the weights, not the loader's float32 images
    features = encoder.features if isinstance(encoder, MAEObjective) or "features" in getattr(
        encoder, "_forward_methods", ()) else (lambda images: pooled_features(encoder, images))
    feats, labels = [], []
    for images, y in loader:
        with fabric.autocast():
            feats.append(features(images.to(dtype)).float())
        labels.append(y)
    return _gather(fabric, torch.cat(feats)), _gather(fabric, torch.cat(labels))


def _gather(fabric: Fabric, x: torch.Tensor) -> torch.Tensor:
    if fabric.world_size == 1:
        return x
    sizes = fabric.all_gather(torch.tensor(len(x), device=x.device))
    padded = torch.zeros((int(sizes.max()), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    gathered = fabric.all_gather(padded)
    return torch.cat([gathered[i, : int(n)] for i, n in enumerate(sizes)])


#: Similarities computed at once by :func:`knn_accuracy` (test rows x training images): 256 MiB in float32.
KNN_BLOCK_ELEMENTS = 2 ** 26


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int, temperature: float, num_classes: int) -> float:
    """Weighted k-NN on cosine similarity (the DINO protocol): top-1 accuracy in percent.

    Features (N, D) are L2-normalised. Test images are taken in blocks whose (rows, N_train) similarity matrix
    holds at most ``KNN_BLOCK_ELEMENTS`` values, so memory does not grow with the test split.
    """
    k = min(k, len(train_feats))
    rows = max(1, min(1024, KNN_BLOCK_ELEMENTS // max(len(train_feats), 1)))
    correct = 0
    for start in range(0, len(test_feats), rows):
        sims, idx = (test_feats[start:start + rows] @ train_feats.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        correct += (votes.argmax(dim=1) == test_labels[start:start + rows]).sum().item()
    return 100.0 * correct / max(len(test_feats), 1)


def check_task_config(t: DictConfig) -> None:
    """Refuse bad ``task.*`` values before training starts, one line each, naming the key, the value and the fix."""
    if not 0 <= t.mask_ratio < 1:
        raise UserError(f"task.mask_ratio must be in [0, 1), got {t.mask_ratio}")
    if t.decoder_dim <= 0 or t.decoder_dim % 4:
        raise UserError(f"task.decoder_dim must be a positive multiple of 4 (its sin-cos position table has four "
                        f"parts), got {t.decoder_dim} (MAE's default here: 128)")
    if t.decoder_depth <= 0:
        raise UserError(f"task.decoder_depth must be positive, got {t.decoder_depth}: without decoder blocks a "
                        f"masked token never sees the visible ones (MAE's default here: 2)")
    if t.decoder_heads <= 0 or t.decoder_dim % t.decoder_heads:
        divisors = [h for h in range(1, min(t.decoder_dim, 16) + 1) if t.decoder_dim % h == 0]
        raise UserError(f"task.decoder_heads={t.decoder_heads} does not divide task.decoder_dim={t.decoder_dim}: "
                        f"use one of {', '.join(map(str, divisors))}")
    if t.knn_k <= 0:
        raise UserError(f"task.knn_k must be positive, got {t.knn_k} (the DINO protocol uses 20)")
    if not (t.knn_temperature > 0 and math.isfinite(t.knn_temperature)):
        raise UserError(f"task.knn_temperature must be a positive number, got {t.knn_temperature} (the DINO "
                        f"protocol uses 0.07)")
    if t.num_vis <= 0:
        raise UserError(f"task.num_vis must be positive, got {t.num_vis} (test images in reconstructions.png)")


@register_task
class MAETask(Task):
    name = "mae"
    config_cls = MAETaskCfg
    monitored = ("test/knn_acc", "max")
    backbone_parts = ("masking", "dense", "classify")  # visible tokens only, pixel targets, pooled k-NN features
    # The token drop goes to the decoder (MAEObjective.set_token_drop): the encoder already sees 1 - mask_ratio of
    # the tokens, a drop on top of that would just be a higher mask ratio.
    recipe_levers = ("token_drop", "low_res")

    def check(self, cfg: DictConfig, data: DataInfo) -> None:
        check_task_config(cfg.task)

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        t = cfg.task
        encoder = build_encoder(cfg, data)
        if t.norm_pix_loss and encoder.patch_embed.patch_size ** 2 * data.in_chans == 1:
            raise UserError("task.norm_pix_loss=true normalises each token by its own mean and variance, but a 1x1 "
                            "patch of a 1-channel image holds a single value (the target would be all zeros): keep "
                            "task.norm_pix_loss=false for pixel tokens")
        model = MaskedAutoencoder(encoder, t.decoder_dim, t.decoder_depth, t.decoder_heads)
        return MAEObjective(model, t.mask_ratio, t.norm_pix_loss)

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        if hasattr(module, "mark_forward_method"):  # set up by Fabric: features() must go through its wrapper
            module.mark_forward_method("features")
        metrics = {"test/recon_loss": mean_loss(ctx.fabric, module, ctx.loaders["test"]),
                   "test/knn_acc": self.knn(module, ctx)}
        if ctx.cfg.task.knn_random_baseline:  # the same encoder, freshly initialised
            metrics.update(untrained_baseline(ctx, lambda: build_encoder(ctx.cfg, ctx.data),
                                              lambda fresh: {"test/knn_acc_random_init": self.knn(fresh, ctx)}))
        return metrics

    def knn(self, encoder: nn.Module, ctx: EvalContext) -> float:
        """Weighted k-NN top-1 accuracy (%) of the encoder's pooled features, training split -> test split
        (``encoder``: as :func:`encoder_features` takes it)."""
        train_feats, train_labels = encoder_features(ctx.fabric, encoder, ctx.loaders["train"])
        test_feats, test_labels = encoder_features(ctx.fabric, encoder, ctx.loaders["test"])
        return knn_accuracy(train_feats, train_labels, test_feats, test_labels, ctx.cfg.task.knn_k,
                            ctx.cfg.task.knn_temperature, ctx.data.num_classes)

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """``reconstructions.png``: rows of originals, masked inputs, and reconstructions with visible pixels."""
        model = module.model
        images, _ = next(iter(ctx.loaders["test"]))
        images = images[: ctx.cfg.task.num_vis].float()
        torch.manual_seed(ctx.cfg.run.seed)
        # the same picture whatever mode the caller left the module in (drop path, dropout)
        with eval_mode(module), torch.no_grad():
            out = module((images.to(next(module.parameters()).dtype), None))
        pred, mask = out["pred"].float(), out["mask"].unsqueeze(-1)
        if module.norm_pix_loss:  # back from per-token normalised values to pixels
            target = model.patchify(images)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        tokens = model.patchify(images)
        masked = model.unpatchify(tokens * (1 - mask))
        pasted = model.unpatchify(tokens * (1 - mask) + pred * mask)
        # masked pixels are shown at the dataset mean (0 in normalised units)
        grid = to_unit_interval(torch.cat([images, masked, pasted]), ctx.data.mean, ctx.data.std)
        return [save_image_grid(grid, out_dir / "reconstructions.png", nrow=len(images), min_side=64)]


def __getattr__(name: str) -> Any:
    """``MAEPretrainer``, the name before 2026-12 (a loss module, not a trainer): still importable, with a warning."""
    if name == "MAEPretrainer":
        warnings.warn("pixelformer.tasks.mae.MAEPretrainer is now MAEObjective", DeprecationWarning, stacklevel=2)
        return MAEObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
