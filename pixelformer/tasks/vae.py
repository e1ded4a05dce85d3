"""A small KL autoencoder (diffusers' ``AutoencoderKL``) trained on the run's data, for latent diffusion on data that
no public VAE was made for (Stable Diffusion's expects 256-pixel RGB photographs, not 28x28 grey garments).

Training: L1 reconstruction of images in [-1, 1] (per pixel) plus ``task.kl_weight`` x the posterior's KL to
N(0, I) summed over the latent and divided by the pixels, which is LDM's weighting (1e-6) with LDM's
per-image sums turned into per-pixel means. LDM's perceptual and adversarial terms are left out: they need a
pretrained LPIPS network and a discriminator, neither of which fits a CPU-sized, offline framework.

Evaluation: ``test/mse`` and ``test/psnr`` (dB, images in [0, 1]) of reconstructions from the posterior mean, and
``test/latent_std``, the standard deviation of latents drawn for training images. Its inverse is the scaling factor
that brings latents to unit variance (what Stable Diffusion's 0.18215 does for its VAE); it is kept in the
checkpoint, so ``task=dit task.latent.vae=<this run's checkpoint>`` diffuses unit-variance latents.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from pixelformer.data import DataInfo, to_unit_interval
from pixelformer.errors import UserError
from pixelformer.rng import per_sample_seeds, randn_like
from pixelformer.task import (EvalContext, Task, TaskCfg, keyed_batches, register_task, save_image_grid,
                             untrained_baseline)


@dataclass
class VAETaskCfg(TaskCfg):
    name: str = "vae"
    # One encoder block per entry, each but the last halving the side: (32, 64, 64) maps 32x32 images to 8x8 latents.
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4  # Stable Diffusion's
    norm_num_groups: int = 32  # GroupNorm groups; must divide every entry of block_out_channels
    kl_weight: float = 1e-6  # LDM's, relative to a per-pixel reconstruction loss
    scale_images: int = 1024  # training images whose latents measure test/latent_std (the scaling factor)
    num_pictures: int = 8  # test images shown with their reconstructions in reconstructions.png


class AutoencoderTrainer(nn.Module):
    """``forward(batch)`` encodes dataset-normalised images, decodes a draw from the posterior and returns the loss;
    ``vae`` is the diffusers ``AutoencoderKL`` a latent DiT loads (``latent_std`` sets its scaling factor)."""

    def __init__(self, vae: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], kl_weight: float) -> None:
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.ones(()))  # measured at each evaluation, saved in checkpoints

    def to_signed_unit_interval(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images -> [-1, 1]."""
        return to_unit_interval(images, self.mean, self.std) * 2 - 1

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.to_signed_unit_interval(batch[0])
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        l1 = (recon.float() - x.float()).abs().mean()
        kl = posterior.kl().float().mean() / x[0].numel()  # per image, summed over the latent; per pixel
        return {"loss": l1 + self.kl_weight * kl, "l1": l1.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images -> reconstructions from the posterior mean, in [0, 1]."""
        x = self.to_signed_unit_interval(images)
        recon = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample
        return ((recon.float() + 1) / 2).clamp(0, 1)

    @property
    def scaling_factor(self) -> float:
        return 1.0 / float(self.latent_std)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    return -10.0 * math.log10(max(mse, 1e-12))


def build_autoencoder(t: DictConfig, data: DataInfo) -> nn.Module:
    from diffusers import AutoencoderKL

    blocks = list(t.block_out_channels)
    if not blocks or any(c % t.norm_num_groups for c in blocks):
        raise UserError(f"task.block_out_channels={blocks} with task.norm_num_groups={t.norm_num_groups}: every "
                        f"block's channels must be a multiple of the group count (e.g. [32,64,64] with 32)")
    factor = 2 ** (len(blocks) - 1)
    if data.img_size % factor:
        raise UserError(f"task.block_out_channels has {len(blocks)} blocks, which downsample {data.img_size}x"
                        f"{data.img_size} images by {factor}: that does not divide the side; set data.img_size to a "
                        f"multiple of {factor} or use fewer blocks")
    return AutoencoderKL(in_channels=data.in_chans, out_channels=data.in_chans,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=tuple(blocks),
                         layers_per_block=t.layers_per_block, latent_channels=t.latent_channels,
                         norm_num_groups=t.norm_num_groups, sample_size=data.img_size)


@register_task
class VAETask(Task):
    name = "vae"
    backbone_parts = ()  # a convolutional autoencoder: no transformer backbone
    config_cls = VAETaskCfg
    monitored = ("test/mse", "min")

    def check(self, cfg: DictConfig, data: DataInfo) -> None:
        t = cfg.task
        if t.kl_weight < 0:
            raise UserError(f"task.kl_weight must be >= 0, got {t.kl_weight} (LDM uses 1e-6)")
        if t.scale_images < 2:
            raise UserError(f"task.scale_images must be at least 2 (a standard deviation), got {t.scale_images}")

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        return AutoencoderTrainer(build_autoencoder(cfg.task, data), data.mean, data.std, cfg.task.kl_weight)

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Reconstruction error on the test split (next to an untrained autoencoder's) and the latent scale."""
        if hasattr(module, "mark_forward_method"):  # set up by Fabric: under DDP / FSDP it must see this call
            module.mark_forward_method("reconstruct")
        mse = self.reconstruction_mse(module, ctx)
        untrained = untrained_baseline(ctx, lambda: self.build_module(ctx.cfg, ctx.data),
                                       lambda fresh: {"test/psnr_untrained": psnr(self.reconstruction_mse(fresh, ctx))})
        fabric = ctx.fabric
        # The std of latents drawn for training images 0 .. scale_images - 1 (SD's recipe for its scaling factor),
        # each image's posterior draw seeded by the image alone: the same value at every evaluation and with any
        # number of processes (the shards deal the images round-robin, so every rank stops within a batch of the end).
        moments = torch.zeros(4, device=fabric.device, dtype=torch.float64)  # sum, sum of squares, elements, images
        wanted = ctx.cfg.task.scale_images
        for (images, _), keys in keyed_batches(ctx.loaders["train"]):
            if keys is None:  # the trainer's evaluation loaders always carry them (build_loader's sampler)
                raise ValueError("the vae latent scale needs the training loader's per-sample (seed, index) keys")
            rows = [i for i, (_, index) in enumerate(keys) if index < wanted]
            if not fabric.all_reduce(torch.tensor(float(len(rows)), device=fabric.device), reduce_op="sum").item():
                break  # every shard is past the wanted images (one collective per batch keeps the ranks in step)
            if not rows:
                continue
            posterior = module.vae.encode(module.to_signed_unit_interval(images[rows])).latent_dist
            with per_sample_seeds([keys[i][0] for i in rows]):
                z = (posterior.mean + posterior.std * randn_like(posterior.mean)).double()
            moments += torch.stack([z.sum(), z.square().sum(), z.new_tensor(z.numel()), z.new_tensor(len(rows))])
        total, squares, count, _ = fabric.all_reduce(moments, reduce_op="sum").tolist()
        latent_std = max(squares / count - (total / count) ** 2, 0.0) ** 0.5
        module.latent_std.fill_(latent_std)
        return {"test/mse": mse, "test/psnr": psnr(mse), **untrained, "test/latent_std": latent_std}

    @staticmethod
    def reconstruction_mse(module: nn.Module, ctx: EvalContext) -> float:
        """Mean squared error of reconstructions from the posterior mean, images in [0, 1], over every process."""
        totals = torch.zeros(2, device=ctx.fabric.device, dtype=torch.float64)  # squared error, pixels
        for images, _ in ctx.loaders["test"]:
            target = (module.to_signed_unit_interval(images.float()) + 1) / 2
            totals[0] += (module.reconstruct(images) - target).double().square().sum()
            totals[1] += target.numel()
        totals = ctx.fabric.all_reduce(totals, reduce_op="sum")
        return float(totals[0] / totals[1])

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """``reconstructions.png``: test images (top row) above their reconstructions."""
        images = next(iter(ctx.loaders["test"]))[0][: ctx.cfg.task.num_pictures]
        originals = (module.to_signed_unit_interval(images.float()) + 1) / 2
        return [save_image_grid(torch.cat([originals, module.reconstruct(images)]), out_dir / "reconstructions.png",
                                nrow=len(images))]

