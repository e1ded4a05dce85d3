"""Diffusion plumbing around any denoiser ``eps = model(x_t, t, y)``: diffusers schedulers, guidance, sampling.

Training uses diffusers' ``DDPMScheduler`` (``add_noise``); sampling builds DDPM, DDIM or DPM-Solver++ from the
training scheduler's config, so every sampler shares one noise schedule. Images live in [-1, 1] (pixel space), where
the schedulers' clipping of the predicted clean image is right.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Literal, Optional

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from torch import nn

__all__ = ["SAMPLERS", "build_sampling_scheduler", "build_train_scheduler", "guided_eps", "latent_geometry", "load_vae",
           "sample", "sample_chunks"]

SAMPLERS = ("ddpm", "ddim", "dpm")


def build_train_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """The forward process: DiT's linear beta schedule (1e-4 -> 2e-2) over 1,000 steps by default."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def build_sampling_scheduler(train_config: dict, sampler: Literal["ddpm", "ddim", "dpm"]):
    """A sampler on the training schedule: ``ddpm`` (ancestral), ``ddim`` (eta 0) or ``dpm`` (DPM-Solver++ 2M)."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(train_config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def guided_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
               null_label: int) -> torch.Tensor:
    """Classifier-free guidance: ``eps_uncond + s * (eps_cond - eps_uncond)``, one doubled batch.

    Only the noise channels are guided and returned (a learned-variance half, if any, is dropped); the channel count
    comes from the input, never a hard-coded 3.
    """
    chans = x.shape[1]
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both[:, :chans].chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample(model: nn.Module, train_config: dict, labels: torch.Tensor, shape: tuple[int, int, int], steps: int,
           cfg_scale: float, sampler: Literal["ddpm", "ddim", "dpm"], null_label: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate images in [-1, 1] of ``shape`` (C, H, W), one per label, deterministically under ``generator``."""
    scheduler = build_sampling_scheduler(train_config, sampler)
    scheduler.set_timesteps(steps)
    device = labels.device
    model_dtype = next(model.parameters()).dtype
    # The trajectory stays float32 whatever the default dtype (Fabric's bf16-true context changes it); the model
    # gets its own dtype, or autocast's where the caller runs one.
    x = torch.randn((len(labels), *shape), generator=generator, device=device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        t_batch = torch.full((len(labels),), int(t), device=device, dtype=torch.long)
        model_in = scheduler.scale_model_input(x, t).to(model_dtype)
        eps = guided_eps(model, model_in, t_batch, labels, cfg_scale, null_label)
        kwargs = {"generator": generator} if sampler != "dpm" or generator is not None else {}
        x = scheduler.step(eps.float(), t, x, **kwargs).prev_sample
    return x.clamp(-1, 1)


def _draw_like_sample(generator: torch.Generator, count: int, shape: tuple[int, int, int], steps: int,
                      sampler: Literal["ddpm", "ddim", "dpm"], train_config: dict) -> None:
    """Advance ``generator`` exactly as :func:`sample` would for ``count`` images, without running the model: the
    initial noise, plus DDPM's noise at every step but the last (DDIM with eta 0 and DPM-Solver++ draw none). A test
    holds this to diffusers' schedulers (sharded sampling equals one process's, sampler by sampler)."""
    size = (count, *shape)
    torch.randn(size, generator=generator, device=generator.device, dtype=torch.float32)
    if sampler == "ddpm":
        scheduler = build_sampling_scheduler(train_config, sampler)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            if int(t) > 0:
                torch.randn(size, generator=generator, device=generator.device, dtype=torch.float32)


def sample_chunks(model: nn.Module, train_config: dict, labels: torch.Tensor, shape: tuple[int, int, int],
                  steps: int, cfg_scale: float, sampler: Literal["ddpm", "ddim", "dpm"], null_label: int, seed: int,
                  batch_size: int, rank: int = 0, world_size: int = 1,
                  precision: Optional[Callable[[], ContextManager]] = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(chunk index, labels, images in [-1, 1])`` for this process's share of ``labels``.

    ``labels`` is cut into chunks of ``batch_size``, generated in order from one generator seeded with ``seed``.
    Process ``rank`` of ``world_size`` samples chunks ``rank``, ``rank + world_size``, ... and only advances the
    generator past the others, so every process produces exactly the samples one process would: the set depends on
    the seed and the batch size, not on the number of processes.
    """
    generator = torch.Generator(labels.device).manual_seed(seed)
    for index, chunk in enumerate(labels.split(batch_size)):
        if index % world_size != rank:
            _draw_like_sample(generator, len(chunk), shape, steps, sampler, train_config)
            continue
        with precision() if precision is not None else contextlib.nullcontext():
            images = sample(model, train_config, chunk, shape, steps, cfg_scale, sampler, null_label, generator)
        yield index, chunk, images.float()


def load_vae(name: str):
    """A frozen diffusers ``AutoencoderKL`` in eval mode, from a folder written by ``save_pretrained`` or a hub id.

    A hub id is fetched only when online; with ``HF_HUB_OFFLINE=1`` it must already be in the local cache.
    """
    from diffusers import AutoencoderKL

    from .errors import UserError

    path = Path(name).expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        vae = AutoencoderKL.from_pretrained(str(path) if path.exists() else name, local_files_only=offline)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... depending on what is missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.exists():
            raise UserError(f"task.vae={name}: no diffusers AutoencoderKL in that folder ({reason}); point it at a "
                            f"folder written by AutoencoderKL.save_pretrained") from None
        raise UserError(f"task.vae={name}: not a local folder, and the hub id could not be loaded ({reason}); "
                        f"offline (HF_HUB_OFFLINE=1, or no network) a hub id loads only from the local cache: download "
                        f"it once, or point task.vae at a local folder written by AutoencoderKL.save_pretrained") from None
    return vae.eval().requires_grad_(False)


def latent_geometry(vae, img_size: int) -> tuple[int, int]:
    """``(channels, side)`` of the latents of ``img_size`` x ``img_size`` images: the encoder halves the side once
    per block but the last."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if img_size % factor:
        raise ValueError(f"the VAE downsamples by {factor}, which does not divide the image size {img_size}")
    return int(vae.config.latent_channels), img_size // factor
