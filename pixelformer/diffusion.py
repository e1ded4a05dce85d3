"""Diffusion plumbing around any denoiser ``eps = model(x_t, t, y)``: diffusers schedulers, guidance, sampling.

Training uses diffusers' ``DDPMScheduler`` (``add_noise``); sampling builds DDPM, DDIM or DPM-Solver++ from the
training scheduler's config, so every sampler shares one noise schedule. Images live in [-1, 1] (pixel space), where
the schedulers' clipping of the predicted clean image is right.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Literal, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # diffusers is imported where a scheduler is built: a run of another task does not pay its import
    from diffusers import DDPMScheduler

__all__ = ["SAMPLERS", "build_sampling_scheduler", "build_train_scheduler", "guided_output", "latent_geometry",
           "learned_range_log_variance", "load_vae", "sample", "sample_chunks", "variational_bound"]

SAMPLERS = ("ddpm", "ddim", "dpm")


def build_train_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> DDPMScheduler:
    """The forward process: DiT's linear beta schedule (1e-4 -> 2e-2) over 1,000 steps by default."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def build_sampling_scheduler(train_config: dict, sampler: Literal["ddpm", "ddim", "dpm"],
                             learned_variance: bool = False):
    """A sampler on the training schedule: ``ddpm`` (ancestral), ``ddim`` (eta 0) or ``dpm`` (DPM-Solver++ 2M).
    With ``learned_variance`` DDPM takes each step's variance from the denoiser's second half of channels (DiT's
    learned sigma); DDIM and DPM-Solver++ are deterministic and use the noise half only."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddpm":
        extra = {"variance_type": "learned_range"} if learned_variance else {}
        return DDPMScheduler.from_config(train_config, **extra)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train_config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++")
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def guided_output(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                  null_label: int) -> torch.Tensor:
    """Classifier-free guidance: ``eps_uncond + s * (eps_cond - eps_uncond)``, one doubled batch.

    Only the noise channels are guided; a learned-variance half, if the denoiser has one, is the conditional pass's
    and follows them (as in DiT's ``forward_with_cfg``). The channel count comes from the input, never a hard-coded 3.
    """
    chans = x.shape[1]
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
    cond, uncond = both.chunk(2)
    guided = uncond[:, :chans] + cfg_scale * (cond[:, :chans] - uncond[:, :chans])
    return torch.cat([guided, cond[:, chans:]], dim=1)


@torch.no_grad()
def sample(model: nn.Module, train_config: dict, labels: torch.Tensor, shape: tuple[int, int, int], steps: int,
           cfg_scale: float, sampler: Literal["ddpm", "ddim", "dpm"], null_label: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Generate images in [-1, 1] of ``shape`` (C, H, W), one per label, deterministically under ``generator``."""
    learned_variance = getattr(model, "out_chans", shape[0]) == 2 * shape[0]
    scheduler = build_sampling_scheduler(train_config, sampler, learned_variance)
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
        out = guided_output(model, model_in, t_batch, labels, cfg_scale, null_label)
        if not (learned_variance and sampler == "ddpm"):
            out = out[:, : shape[0]]
        kwargs = {"generator": generator} if sampler != "dpm" or generator is not None else {}
        x = scheduler.step(out.float(), t, x, **kwargs).prev_sample
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
    """A frozen diffusers ``AutoencoderKL`` in eval mode, from a folder written by ``save_pretrained``, a hub id, or
    a pixelformer run that trained one (a ``.ckpt`` file or run directory of ``task=vae``: its scaling factor is the
    inverse of the latent standard deviation the run measured).

    A hub id is fetched only when online; with ``HF_HUB_OFFLINE=1`` it must already be in the local cache.
    """
    from diffusers import AutoencoderKL

    from .errors import UserError

    path = Path(name).expanduser()
    if path.is_file() or (path / "checkpoints").is_dir():
        return _vae_of_run(name)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        vae = AutoencoderKL.from_pretrained(str(path) if path.exists() else name, local_files_only=offline)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError... depending on what is missing
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if path.exists():
            raise UserError(f"task.latent.vae={name}: no diffusers AutoencoderKL in that folder ({reason}); point it "
                            f"at a folder written by AutoencoderKL.save_pretrained, or a task=vae run") from None
        raise UserError(f"task.latent.vae={name}: not a local folder, and the hub id could not be loaded ({reason}); "
                        f"offline (HF_HUB_OFFLINE=1, or no network) a hub id loads only from the local cache: download "
                        f"it once, or point task.latent.vae at a local folder written by "
                        f"AutoencoderKL.save_pretrained") from None
    return vae.eval().requires_grad_(False)


def _vae_of_run(name: str):
    """The ``AutoencoderKL`` of a saved run whose module holds one as ``vae`` (a ``task=vae`` run), with the run's
    measured scaling factor written into its config."""
    from diffusers import AutoencoderKL

    from .errors import UserError
    from .saved import load_run

    module = load_run(name).module
    vae = getattr(module, "vae", None)
    if not isinstance(vae, AutoencoderKL) or not hasattr(module, "scaling_factor"):
        raise UserError(f"task.latent.vae={name} is a checkpoint without a trained autoencoder: point it at a "
                        f"task=vae run's checkpoint, a save_pretrained folder or a hub id")
    vae.register_to_config(scaling_factor=module.scaling_factor)
    return vae.eval().requires_grad_(False)


def latent_geometry(vae, img_size: int) -> tuple[int, int]:
    """``(channels, side)`` of the latents of ``img_size`` x ``img_size`` images: the encoder halves the side once
    per block but the last."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if img_size % factor:
        raise ValueError(f"the VAE downsamples by {factor}, which does not divide the image size {img_size}")
    return int(vae.config.latent_channels), img_size // factor


def _posterior_tables(scheduler: DDPMScheduler, device: torch.device) -> dict[str, torch.Tensor]:
    """Per-timestep float64 tables of q(x_{t-1} | x_t, x_0) on the scheduler's betas (DiT's gaussian_diffusion.py
    has the same ones): the clipped log variance repeats step 1's at step 0, where the true variance is 0."""
    betas = scheduler.betas.double().to(device)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    variance = betas * (1 - prev) / (1 - alphas_cumprod)
    return {"alphas_cumprod": alphas_cumprod, "log_beta": betas.log(),
            "log_variance": torch.cat([variance[1:2], variance[1:]]).log(),
            "mean_x0": betas * prev.sqrt() / (1 - alphas_cumprod),
            "mean_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)}


def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return table[t].view(-1, 1, 1, 1)


def learned_range_log_variance(tables: dict[str, torch.Tensor], t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The denoiser's log variance from its output ``v`` in [-1, 1]: a log-space interpolation between the posterior
    variance (v = -1) and beta_t (v = +1), Improved DDPM's "learned range" (diffusers' ``variance_type``)."""
    frac = (v.double() + 1) / 2
    return frac * _at(tables["log_beta"], t) + (1 - frac) * _at(tables["log_variance"], t)


def _gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def _discretized_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255, the two edge bins open-ended) under N(mean, scale^2).
    The normal CDF is ``torch.special.ndtr`` (DiT uses a tanh approximation of it)."""
    inv_scale = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_scale * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_scale * (x - mean - 1 / 255))
    log_bin = torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                          torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                      (cdf_plus - cdf_min).clamp(min=1e-12).log()))
    return log_bin


def variational_bound(scheduler: DDPMScheduler, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                      eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per-sample term L_t of the variational bound in bits per dimension, (B,): KL(q(x_{t-1}|x_t,x_0) ||
    p(x_{t-1}|x_t)) for t > 0 and the decoder's negative log-likelihood of x_0 at t = 0.

    p's mean comes from the predicted noise ``eps`` and its variance from ``v`` (:func:`learned_range_log_variance`).
    DiT's hybrid loss adds this to the noise MSE with ``eps`` detached, so the bound trains the variance only.
    Written here because diffusers has schedulers for sampling but no variational-bound loss for training.
    """
    tables = _posterior_tables(scheduler, xt.device)
    x0, xt, eps = x0.double(), xt.double(), eps.double()
    abar = _at(tables["alphas_cumprod"], t)
    x0_pred = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
    true_mean = _at(tables["mean_x0"], t) * x0 + _at(tables["mean_xt"], t) * xt
    model_mean = _at(tables["mean_x0"], t) * x0_pred + _at(tables["mean_xt"], t) * xt
    model_log_var = learned_range_log_variance(tables, t, v)
    kl = _gaussian_kl(true_mean, _at(tables["log_variance"], t), model_mean, model_log_var).flatten(1).mean(1)
    nll = -_discretized_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
    return (torch.where(t == 0, nll, kl) / math.log(2)).float()
