"""Class-conditional diffusion in pixel space with a DiT-style denoiser on pixel tokens.

Training: epsilon-prediction MSE on ``DDPMScheduler.add_noise`` samples, label dropout for classifier-free guidance,
an EMA of the denoiser (saved in checkpoints, used for evaluation and sampling). Evaluation: the diffusion loss on
the test split and, with ``task.classifier_ckpt`` (a ``cls`` checkpoint of the same data), the Fréchet distance
between generated and real test images on that classifier's features and its accuracy on the samples given their
conditioning labels, next to the same numbers for an untrained denoiser.

diffusers provides no variational-bound loss, so the variance is not learned here (``learn_sigma`` is refused).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from pixelformer.config import TaskCfg
from pixelformer.data import DataInfo
from pixelformer.diffusion import build_train_scheduler, sample, update_ema
from pixelformer.errors import UserError
from pixelformer.metrics import ClassifierFeatures, build_fid, load_classifier
from pixelformer.models import DiT, create_dit
from pixelformer.task import Task, register_task


@dataclass
class DiTTaskCfg(TaskCfg):
    name: str = "dit"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    label_dropout: float = 0.1  # probability of training a sample unconditionally (classifier-free guidance)
    learn_sigma: bool = False  # refused: diffusers has no variational-bound loss to train it
    ema_decay: float = 0.9999  # ramped up from (1 + step) / (10 + step) early in training
    sampler: Literal["ddpm", "ddim", "dpm"] = "ddim"
    sample_steps: int = 50
    cfg_scale: float = 4.0
    seed: int = 0  # sampling seed for evaluation and pictures
    classifier_ckpt: Optional[str] = None  # cls checkpoint on the same data: FID features + sample accuracy
    fid_features: Literal["classifier", "inception"] = "classifier"
    inception_weights: Optional[str] = None  # local weights-inception-2015-12-05-6726825d.pth for Inception FID
    num_eval_samples: int = 200
    untrained_baseline: bool = True  # also report FID / accuracy of an untrained denoiser's samples
    samples_per_class: int = 8  # columns of samples.png (one row per class)


class DiffusionTrainer(nn.Module):
    """``forward(batch)`` noises the images at random timesteps and returns the epsilon-prediction loss."""

    def __init__(self, denoiser: DiT, scheduler, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images -> [-1, 1], the range the schedulers' clipping assumes."""
        return ((images * self.std + self.mean) * 2 - 1).clamp(-1, 1)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        x0 = self.to_unit_range(images)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = self.denoiser(xt, t, labels)
        return {"loss": F.mse_loss(pred[:, : x0.shape[1]].float(), noise)}


def build_denoiser(cfg: DictConfig, data: DataInfo) -> DiT:
    model = cfg.model
    unsupported = [k for k in ("pool", "class_token", "drop_rate", "attn_drop_rate", "drop_path_rate")
                   if model.get(k) is not None]
    if unsupported:
        raise UserError(f"model.{unsupported[0]} has no meaning for the dit denoiser; remove it")
    if model.pos_embed == "none":
        raise UserError("the dit denoiser needs positions: model.pos_embed=sincos (DiT's) or learned")
    try:
        return create_dit(model.name, img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes,
                          patch_size=model.patch_size, depth=model.depth, embed_dim=model.embed_dim,
                          num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, pos_embed=model.pos_embed,
                          class_dropout_prob=cfg.task.label_dropout)
    except ValueError as e:
        raise UserError(f"cannot build a DiT {model.name} for {data.name} ({data.img_size}x{data.img_size}x"
                        f"{data.in_chans}): {e}") from None


@register_task
class DiTTask(Task):
    name = "dit"
    config_cls = DiTTaskCfg
    monitor = ("test/loss", "min")

    def __init__(self) -> None:
        self.info: Optional[DataInfo] = None
        self.ema: Optional[DiT] = None
        self.classifier: Optional[ClassifierFeatures] = None
        self._baseline: Optional[dict[str, float]] = None
        self.scheduler_config: dict = {}
        self.ema_decay = 0.9999

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        t = cfg.task
        if t.learn_sigma:
            raise UserError("task.learn_sigma=true needs a variational-bound loss, which diffusers does not provide; "
                            "train epsilon only (learn_sigma=false)")
        self.info = data
        if t.classifier_ckpt is not None:
            self.classifier = load_classifier(t.classifier_ckpt)  # fails early, before any training
            self.monitor = ("test/fid", "min")
        if t.fid_features == "inception":  # its weights must already be on disk: fail now, not at the first eval
            build_fid("inception", None, t.inception_weights, (data.in_chans, data.img_size, data.img_size))
        scheduler = build_train_scheduler(t.num_train_timesteps, t.beta_schedule)
        self.scheduler_config = dict(scheduler.config)
        self.ema_decay = t.ema_decay
        return DiffusionTrainer(build_denoiser(cfg, data), scheduler, data.mean, data.std)

    def extra_state(self, fabric: Fabric, module: nn.Module) -> dict[str, nn.Module]:
        if self.ema is None:  # DiT's recipe: the EMA starts as an exact copy
            self.ema = copy.deepcopy(module.module.denoiser).requires_grad_(False).eval()
        return {"ema": self.ema}

    def on_train_step_end(self, module: nn.Module, step: int) -> None:
        # Warm-up: early on the average would be dominated by the initial (zero-output) weights.
        update_ema(self.ema, module.module.denoiser, min(self.ema_decay, (1 + step) / (10 + step)))

    def evaluate(self, fabric: Fabric, module: nn.Module, loaders: dict[str, DataLoader],
                 cfg: DictConfig) -> dict[str, float]:
        totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)
        for batch in loaders["test"]:
            totals += torch.stack([module(batch)["loss"].double() * len(batch[1]),
                                   torch.tensor(len(batch[1]), device=fabric.device, dtype=torch.float64)])
        totals = fabric.all_reduce(totals, reduce_op="sum")
        metrics = {"test/loss": (totals[0] / totals[1].clamp(min=1)).item()}
        if self.classifier is None:
            return metrics
        if fabric.world_size > 1:
            warnings.warn("sample metrics are computed on rank 0's samples only", stacklevel=2)
        real = torch.cat([module.module.to_unit_range(images) for images, _ in loaders["test"]])
        metrics.update(self.sample_metrics(fabric, self.ema, real, cfg, ""))
        if cfg.task.untrained_baseline:
            if self._baseline is None:
                torch.manual_seed(cfg.run.seed)
                fresh = fabric.to_device(build_denoiser(cfg, self.info)).eval()
                self._baseline = self.sample_metrics(fabric, fresh, real, cfg, "_untrained")
            metrics.update(self._baseline)
        return metrics

    def sample_metrics(self, fabric: Fabric, denoiser: nn.Module, real: torch.Tensor, cfg: DictConfig,
                       suffix: str) -> dict[str, float]:
        """FID between samples and real test images, and the classifier's accuracy on the samples."""
        t = cfg.task
        labels = torch.arange(t.num_eval_samples, device=fabric.device) % self.info.num_classes
        fake = self.generate(fabric, denoiser, labels, cfg)
        classifier = fabric.to_device(self.classifier)
        fid = fabric.to_device(build_fid(t.fid_features, classifier, t.inception_weights, tuple(real.shape[1:])))
        fid.update((real + 1) / 2, real=True)
        fid.update((fake + 1) / 2, real=False)
        accuracy = (classifier.logits((fake + 1) / 2).argmax(dim=1) == labels).float().mean().item() * 100
        return {f"test/fid{suffix}": float(fid.compute()), f"test/sample_acc{suffix}": accuracy}

    def generate(self, fabric: Fabric, denoiser: nn.Module, labels: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
        t = cfg.task
        generator = torch.Generator(fabric.device).manual_seed(t.seed)
        shape = (self.info.in_chans, self.info.img_size, self.info.img_size)
        outs = []
        for chunk in labels.split(256):
            with fabric.autocast():
                outs.append(sample(denoiser, self.scheduler_config, chunk, shape, t.sample_steps,
                                   t.cfg_scale, t.sampler, self.info.num_classes, generator).float())
        return torch.cat(outs)

    def visualize(self, fabric: Fabric, module: nn.Module, loaders: dict[str, DataLoader], cfg: DictConfig,
                  out_dir: Path, step: int) -> list[Path]:
        """``samples.png``: one row per class, EMA weights, the configured sampler and guidance."""
        from torchvision.utils import save_image

        per_class = cfg.task.samples_per_class
        labels = torch.arange(self.info.num_classes, device=fabric.device).repeat_interleave(per_class)
        images = (self.generate(fabric, self.ema, labels, cfg) + 1) / 2
        scale = max(1, 32 // images.shape[-1])
        images = F.interpolate(images.cpu(), scale_factor=scale, mode="nearest")
        path = out_dir / "samples.png"
        save_image(images, path, nrow=per_class, padding=2, pad_value=1.0)
        return [path]


def load_for_sampling(path: str | Path) -> tuple[DiT, DataInfo, dict]:
    """The EMA denoiser of a dit checkpoint, its data description and its training noise schedule."""
    from pixelformer.checkpoint import check_state_dict, read_checkpoint
    from pixelformer.config import saved_run

    ckpt = read_checkpoint(path)
    if ckpt.get("config", {}).get("task", {}).get("name") != "dit" or "ema" not in ckpt:
        raise UserError(f"{path} is not a dit checkpoint (no EMA denoiser in it)")
    cfg, info = saved_run(ckpt)
    denoiser = build_denoiser(cfg, info)
    check_state_dict(denoiser, ckpt["ema"], f"{path} (ema)")
    denoiser.load_state_dict(ckpt["ema"])
    scheduler = build_train_scheduler(cfg.task.num_train_timesteps, cfg.task.beta_schedule)
    return denoiser.eval(), info, dict(scheduler.config)
