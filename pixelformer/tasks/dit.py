"""Class-conditional diffusion in pixel space with a DiT-style denoiser on pixel tokens.

Training: epsilon-prediction MSE on ``DDPMScheduler.add_noise`` samples, label dropout for classifier-free guidance,
an EMA of the denoiser (saved in checkpoints, used for evaluation and sampling). Evaluation: the diffusion loss on
the test split and, with ``task.classifier_ckpt`` (a ``cls`` checkpoint of the same data), the Fréchet distance
between generated and real test images on that classifier's features and its accuracy on the samples given their
conditioning labels, next to the same numbers for an untrained denoiser.

With ``task.learn_sigma`` the denoiser also outputs a per-pixel variance (DiT's and Improved DDPM's "learned
range"), trained by DiT's hybrid loss: the noise MSE plus the variational bound with the predicted noise held fixed
(``pixelformer.diffusion.variational_bound``); DDPM sampling then takes its step variances from the denoiser.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from pixelformer import rng
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import eval_batch_size
from pixelformer.data import DataInfo, to_unit_interval
from pixelformer.diffusion import build_train_scheduler, latent_geometry, load_vae, sample_chunks, variational_bound
from pixelformer.errors import CheckpointError, UserError
from pixelformer.layers import is_sincos_table, resize_pos_embed
from pixelformer.metrics import ClassifierFeatures, build_fid, load_classifier
from pixelformer.recipe import levers_in_use
from pixelformer.models import DiT, create_dit
from pixelformer.task import EvalContext, Task, TaskCfg, eval_mode, mean_loss, register_task, save_image_grid, \
    untrained_baseline


@dataclass
class LatentCfg:
    """``task.latent.*``: diffuse the latents of a diffusers ``AutoencoderKL`` instead of pixels."""
    vae: Optional[str] = None  # a save_pretrained folder, or a hub id when online; None: pixel space
    scaling_factor: Optional[float] = None  # None: the VAE's own config.scaling_factor (SD's: 0.18215)
    cache: bool = False  # encode the training split once (pixelformer/latents.py), not at every step
    cache_dir: Optional[str] = None  # None: <data.root>/latent-cache (runs/latent-cache for embedded data)


@dataclass
class DiTTaskCfg(TaskCfg):
    name: str = "dit"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    label_dropout: float = 0.1  # probability of training a sample unconditionally (classifier-free guidance)
    learn_sigma: bool = False  # also learn the variance (DiT's hybrid loss); used by the ddpm sampler
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
    latent: LatentCfg = field(default_factory=LatentCfg)  # latent diffusion through a VAE (task.latent.vae=...)


class DiffusionObjective(nn.Module):
    """``forward(batch)`` noises the images (or their VAE latents) at random timesteps and returns the
    epsilon-prediction loss (plus the variational bound for a denoiser that learns its variance: DiT's hybrid
    loss); ``decode`` maps what the denoiser generates back to images in [-1, 1]."""

    def __init__(self, denoiser: DiT, scheduler, mean: tuple[float, ...], std: tuple[float, ...], vae: Any = None,
                 latent_scale: float = 1.0) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        # In a tuple, not a submodule: the frozen VAE is neither trained nor saved in checkpoints (it is loaded again
        # from task.latent.vae); it follows the inputs to their device.
        self._vae = (vae,)
        self.latent_scale = latent_scale
        self.sample_shape = (denoiser.in_chans, denoiser.x_embedder.img_size, denoiser.x_embedder.img_size)

    @property
    def backbone(self) -> nn.Module:
        """The transformer inside the denoiser (its blocks adaLN-conditioned): what the analysis reads."""
        return self.denoiser.backbone

    @property
    def vae(self) -> Any:
        return self._vae[0]

    def to_signed_unit_interval(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset-normalised images -> [-1, 1], the range the schedulers' clipping (and a VAE) assume."""
        return to_unit_interval(images, self.mean, self.std) * 2 - 1

    @torch.no_grad()
    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> what the denoiser learns to generate: themselves, or scaled latents sampled from the
        VAE's posterior (B, C_latent, H / f, W / f)."""
        if self.vae is None:
            return images01
        vae = self.vae.to(images01.device)
        posterior = vae.encode(images01.to(vae.dtype)).latent_dist  # a draw as diffusers' posterior.sample() makes
        latents = posterior.mean + posterior.std * rng.randn(posterior.mean.shape, posterior.mean.device,
                                                             posterior.mean.dtype)
        return (latents * self.latent_scale).float()

    @torch.no_grad()
    def decode(self, generated: torch.Tensor) -> torch.Tensor:
        """What the denoiser generated -> images in [-1, 1] (B, C, H, W)."""
        if self.vae is None:
            return generated
        vae = self.vae.to(generated.device)
        return vae.decode((generated / self.latent_scale).to(vae.dtype)).sample.float().clamp(-1, 1)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch
        if self.vae is not None and images.shape[1:] == (2 * self.sample_shape[0], *self.sample_shape[1:]):
            mean, std = images.float().chunk(2, dim=1)  # a cached posterior (pixelformer.latents): a fresh draw,
            # in logical order like diffusers' posterior.sample() (randn_like would follow a channels-last layout)
            draw = rng.randn(mean.shape, device=mean.device, dtype=mean.dtype)
            x0 = (mean + std * draw) * self.latent_scale
        else:
            x0 = self.encode(self.to_signed_unit_interval(images))
        # per sample inside rng.per_sample_seeds (evaluation), so test losses do not depend on the sharding
        noise = rng.randn_like(x0)
        t = rng.randint(self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt = self.scheduler.add_noise(x0, noise, t)
        pred = self.denoiser(xt.to(images.dtype), t, labels).float()
        eps, variance = pred[:, : x0.shape[1]], pred[:, x0.shape[1]:]
        if variance.shape[1] == 0:  # one reduction over everything, as before learned sigma existed (same bits)
            return {"loss": F.mse_loss(eps, noise.float())}
        # DiT's hybrid loss: the bound sees the noise prediction detached, so it trains the variance only
        mse = (eps - noise.float()).square().flatten(1).mean(1)
        vb = variational_bound(self.scheduler, x0, xt, t, eps.detach(), variance)
        return {"loss": (mse + vb).mean(), "mse": mse.mean().detach(), "vb": vb.mean().detach()}


def check_task_config(t: DictConfig) -> None:
    """Refuse bad ``task.*`` values before training starts, one line each, naming the key, the value and the fix."""
    if not 0 <= t.label_dropout < 1:
        raise UserError(f"task.label_dropout must be in [0, 1), got {t.label_dropout}: it is the probability of "
                        f"dropping a label in training (DiT uses 0.1)")
    if not math.isfinite(t.cfg_scale):
        raise UserError(f"task.cfg_scale must be a finite number, got {t.cfg_scale}: 1.0 turns guidance off, "
                        f"larger values strengthen it (configs/task/dit.yaml uses 2.0)")
    if t.label_dropout == 0 and t.cfg_scale != 1:  # guidance mixes in the null class, which only label dropout trains
        raise UserError(f"task.label_dropout=0 with task.cfg_scale={t.cfg_scale}: guidance would use the null-class "
                        f"embedding, which label dropout never trained; set task.label_dropout>0 (DiT uses 0.1) or "
                        f"task.cfg_scale=1.0")
    if t.num_train_timesteps <= 0:
        raise UserError(f"task.num_train_timesteps must be positive, got {t.num_train_timesteps} (DiT uses 1000)")
    if t.sample_steps <= 0:
        raise UserError(f"task.sample_steps must be positive, got {t.sample_steps} (e.g. 50)")
    if t.sample_steps > t.num_train_timesteps:
        raise UserError(f"task.sample_steps={t.sample_steps} exceeds task.num_train_timesteps="
                        f"{t.num_train_timesteps}: a sampler cannot take more steps than the training schedule has; "
                        f"set task.sample_steps<={t.num_train_timesteps}")
    if not 0 <= t.ema_decay <= 1:
        raise UserError(f"task.ema_decay must be in [0, 1], got {t.ema_decay} (DiT uses 0.9999)")
    if t.num_eval_samples < 2:
        raise UserError(f"task.num_eval_samples must be at least 2 (the Fréchet distance needs two samples), got "
                        f"{t.num_eval_samples}")
    if t.samples_per_class <= 0:
        raise UserError(f"task.samples_per_class must be positive, got {t.samples_per_class} (columns of "
                        f"samples.png)")


def build_denoiser(cfg: DictConfig, data: DataInfo) -> DiT:
    model = cfg.model
    unsupported = [k for k in ("pool", "global_pool", "class_token", "reg_tokens", "fc_norm", "drop_rate",
                               "attn_drop_rate", "drop_path_rate", "patch_drop_rate", "init_values", "qk_norm")
                   if model.get(k) is not None]
    if unsupported:
        raise UserError(f"model.{unsupported[0]} has no meaning for the dit denoiser; remove it")
    if model.pos_embed == "none":
        raise UserError("the dit denoiser needs positions: model.pos_embed=sincos (DiT's) or learned")
    sizes = {k: v for k, v in model.items() if k not in ("name", "pos_embed") and v is not None}
    try:
        return create_dit(model.name, img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes,
                          pos_embed=model.pos_embed, class_dropout_prob=cfg.task.label_dropout,
                          learn_sigma=cfg.task.learn_sigma, **sizes)
    except ValueError as e:
        raise UserError(f"cannot build a DiT {model.name} for {data.name} ({data.img_size}x{data.img_size}x"
                        f"{data.in_chans}): {e}") from None


_LABEL_TABLE = "y_embedder.embedding_table.weight"


def denoiser_state(ckpt: dict[str, Any], path: str) -> tuple[dict[str, torch.Tensor], str]:
    """The denoiser weights in a checkpoint and where they came from; refuses checkpoints that hold no DiT.

    A pixelformer dit checkpoint gives its EMA weights when it has them (what evaluation and sampling use), else
    its training weights; a plain DiT state dict (reference key names, optionally under ``ema`` or ``model``) is
    taken as it is.
    """
    config = ckpt.get("config")
    task = config.get("task", {}).get("name") if isinstance(config, dict) else None
    if task == "dit":
        if isinstance(ckpt.get("ema"), dict):
            return ckpt["ema"], "EMA weights"
        model = ckpt.get("model", {})
        return {k[len("denoiser."):]: v for k, v in model.items() if k.startswith("denoiser.")}, "training weights"
    state = next((ckpt[k] for k in ("ema", "model", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    if task is None and "t_embedder.mlp.0.weight" in state and "x_embedder.proj.weight" in state:
        return state, "DiT weights"
    what = f"a {task} checkpoint" if task else "not a DiT checkpoint (no t_embedder / x_embedder keys)"
    raise CheckpointError(f"init_from={path} is {what}: a dit denoiser starts only from a dit checkpoint (a task=dit "
                          f"run's, or a DiT state dict), since an encoder has no adaLN timestep/label conditioning "
                          f"layers; drop init_from to train from scratch")


def load_denoiser_weights(denoiser: DiT, state: dict[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Load ``state`` into ``denoiser`` key for key and shape for shape, and report what happened.

    Allowed differences: the label table of another number of classes (re-initialised), a learned position table of
    another grid (resized), a saved fixed table equal to the model's sin-cos one (kept), and a learned table the
    checkpoint lacks (it starts from the sin-cos table, as DiT's learned tables do). Anything else is an error.
    """
    expected, state = denoiser.reference_state_dict(), DiT.to_reference_names(state)
    loaded, reinitialised, matched, problems = {}, [], [], []
    for key, value in state.items():
        want = expected.get(key)
        if want is not None and value.shape == want.shape:
            loaded[key] = value
        elif want is not None and key == _LABEL_TABLE and value.shape[1:] == want.shape[1:]:
            reinitialised.append(key)  # another number of classes: the rows mean other labels
        elif want is not None and key == "pos_embed" and value.ndim == 3 and value.shape[-1] == want.shape[-1]:
            loaded[key] = resize_pos_embed(value, denoiser.x_embedder.grid_size, 0)
        elif want is not None:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
        elif key == "pos_embed" and value.shape[-1] == denoiser.pos_embed.shape[-1] and is_sincos_table(value, 0):
            matched.append(key)
        elif key == "pos_embed":
            problems.append("pos_embed: the checkpoint's position table is not the fixed sin-cos table this model "
                            "computes (model.pos_embed=sincos): set model.pos_embed=learned to load it")
        else:
            problems.append(f"{key}: in the checkpoint but not in the model")
    for key in sorted(set(expected) - set(state)):
        if key == "pos_embed":
            reinitialised.append(key)
        else:
            problems.append(f"{key}: in the model but not in the checkpoint")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"the checkpoint's {source} do not fit this dit denoiser:\n  " + "\n  ".join(problems[:10]) + more
            + "\n  Configure the model like the checkpoint's (model=<its size>, model.depth, model.embed_dim, "
              "model.num_heads, model.patch_size, model.pos_embed, task.learn_sigma) on data with the same channels."
        )
    denoiser.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "dropped": [], "reinitialised": sorted(reinitialised),
            "matched_fixed": matched, "source": [source]}


@register_task
class DiTTask(Task):
    name = "dit"
    config_cls = DiTTaskCfg
    ema_target = "denoiser"  # the trainer keeps its EMA (task.ema_decay); evaluation and sampling use that copy
    backbone_parts = ("dense", "conditioning")  # a noise prediction per pixel, adaLN-Zero around its blocks
    # Progressive resolution (as latent and pixel diffusion models are trained: small images first): the denoiser
    # predicts the noise of whatever grid the backbone is set to. Not token drop: every pixel's noise is predicted,
    # and a dropped token has no output (MaskDiT adds a reconstruction head for those; not built here).
    recipe_levers = ("low_res",)

    def monitor(self, cfg: DictConfig) -> tuple[str, str]:
        return ("test/fid", "min") if scores_samples(cfg.task) else ("test/loss", "min")

    #: Flat keys of runs saved before the latent settings moved under ``task.latent``.
    _RENAMED = {"vae": "vae", "vae_scaling_factor": "scaling_factor", "cache_latents": "cache",
                "latent_cache_dir": "cache_dir"}

    def upgrade_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        moved = {new: saved.pop(old) for old, new in self._RENAMED.items() if old in saved}
        if moved:
            saved["latent"] = {**moved, **dict(saved.get("latent") or {})}
        return saved

    def check(self, cfg: DictConfig, data: DataInfo) -> None:
        t = cfg.task
        check_task_config(t)
        if t.latent.vae is not None and "low_res" in levers_in_use(cfg.recipe):
            raise UserError(f"recipe.low_res_scale={cfg.recipe.low_res_scale} with task.latent.vae={t.latent.vae}: "
                            f"progressive resolution resizes pixels, and the latent grid would not follow; set "
                            f"recipe.low_res_scale=null or task.latent.vae=null")
        if t.classifier_ckpt is not None:
            load_classifier(t.classifier_ckpt)  # a missing or wrong file fails now, not at the first evaluation
        if t.fid_features == "inception":  # its weights must already be on disk
            build_fid("inception", None, t.inception_weights, (data.in_chans, data.img_size, data.img_size))

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        t = cfg.task
        scheduler = build_train_scheduler(t.num_train_timesteps, t.beta_schedule)
        if t.latent.vae is None:
            return DiffusionObjective(build_denoiser(cfg, data), scheduler, data.mean, data.std)
        vae = load_vae(t.latent.vae)
        try:
            channels, side = latent_geometry(vae, data.img_size)
        except ValueError as e:
            raise UserError(f"task.latent.vae={t.latent.vae} on {data.img_size}x{data.img_size} images: {e}; resize with "
                            f"data.img_size") from None
        if vae.config.in_channels != data.in_chans:
            raise UserError(f"task.latent.vae={t.latent.vae} encodes {vae.config.in_channels}-channel images but {data.name} has "
                            f"{data.in_chans}: use a VAE made for the data's channels")
        scale = t.latent.scaling_factor if t.latent.scaling_factor is not None else vae.config.scaling_factor
        latents = dataclasses.replace(data, in_chans=channels, img_size=side)
        return DiffusionObjective(build_denoiser(cfg, latents), scheduler, data.mean, data.std, vae, scale)

    def training_set(self, fabric: Any, cfg: DictConfig, module: nn.Module, train_set: Any) -> Any:
        """With ``task.latent.cache``: the training split's VAE posteriors, encoded once (``pixelformer.latents``)."""
        if not cfg.task.latent.cache:
            return train_set
        if module.vae is None:
            raise UserError("task.latent.cache=true caches VAE latents: set task.latent.vae=<AutoencoderKL folder or hub id>, "
                            "or task.latent.cache=false")
        if module.sample_shape[1:] == (train_set[0][0].shape[-2], train_set[0][0].shape[-1]):
            raise UserError(f"task.latent.cache=true needs a VAE that downsamples: task.latent.vae={cfg.task.latent.vae} keeps the "
                            f"image size, so cached latents and images could not be told apart")
        from pixelformer.latents import latent_training_set

        return latent_training_set(cfg, module.vae, train_set, module.to_signed_unit_interval, fabric.device,
                                   write=fabric.is_global_zero, wait=fabric.barrier)

    def init_from(self, module: nn.Module, path: str) -> dict[str, list[str]]:
        """Start the denoiser (and so its EMA) from another DiT's weights; see :func:`load_denoiser_weights`."""
        state, source = denoiser_state(read_checkpoint(path), path)
        return load_denoiser_weights(module.denoiser, state, source)

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """The diffusion loss on the test split (training weights); with a classifier, FID and sample accuracy of
        the EMA denoiser's samples, next to an untrained denoiser's."""
        metrics = {"test/loss": mean_loss(ctx.fabric, module, ctx.loaders["test"])}
        if not scores_samples(ctx.cfg.task):
            return metrics
        metrics.update(self.sample_metrics(ctx, module, ctx.ema, ""))
        if ctx.cfg.task.untrained_baseline:
            chans, side, _ = module.sample_shape  # the pixels', or a latent run's latents
            generated = dataclasses.replace(ctx.data, in_chans=chans, img_size=side)
            metrics.update(untrained_baseline(ctx, lambda: build_denoiser(ctx.cfg, generated),
                                              lambda fresh: self.sample_metrics(ctx, module, fresh, "_untrained")))
        return metrics

    def scorers(self, ctx: EvalContext) -> tuple[Optional[ClassifierFeatures], Any]:
        """The classifier (``None`` without ``task.classifier_ckpt``: Inception FID only, no sample accuracy) and a
        Fréchet-distance metric holding the real test images' feature statistics (fed batch by batch), made once
        per run."""
        t, data, fabric = ctx.cfg.task, ctx.data, ctx.fabric
        if "classifier" not in ctx.cache:
            ctx.cache["classifier"] = load_classifier(t.classifier_ckpt) if t.classifier_ckpt is not None else None
        classifier = ctx.cache["classifier"]
        if classifier is not None:
            classifier = ctx.cache["classifier"] = fabric.to_device(classifier)
        if "fid" not in ctx.cache:
            ctx.cache["fid"] = real_image_fid(fabric, classifier, ctx.loaders["test"], data, t)
        return classifier, ctx.cache["fid"]

    def sample_metrics(self, ctx: EvalContext, module: nn.Module, denoiser: nn.Module,
                       suffix: str) -> dict[str, float]:
        """FID between ``denoiser``'s samples (decoded by ``module``) and the real images, and the classifier's
        accuracy on the samples.

        Every process generates its share of ``task.num_eval_samples`` (chunks of the eval batch, dealt round-robin);
        the Fréchet statistics and the correct counts are summed over processes, so N GPUs take 1/N of the time
        and score the same samples as one. Chunks are scored and dropped one at a time: memory does not grow with
        ``task.num_eval_samples``.
        """
        classifier, fid = self.scorers(ctx)
        fabric = ctx.fabric
        fid.reset()  # drops the previous samples' statistics, keeps the real images' (reset_real_features=False)
        labels = torch.arange(ctx.cfg.task.num_eval_samples, device=fabric.device) % ctx.data.num_classes
        correct = torch.zeros((), device=fabric.device, dtype=torch.float64)
        for chunk, fake in generate_chunks(module, denoiser, labels, ctx.cfg, fabric.device, fabric.global_rank,
                                           fabric.world_size):
            fake01 = (fake + 1) / 2
            fid.update(fake01, real=False)
            if classifier is not None:
                correct += (classifier.logits(fake01).argmax(dim=1) == chunk).sum()
        correct = fabric.all_reduce(correct, reduce_op="sum")
        # torchmetrics sums the real and generated feature statistics of every process in compute()
        metrics = {f"test/fid{suffix}": float(fid.compute())}
        if classifier is not None:
            metrics[f"test/sample_acc{suffix}"] = 100.0 * float(correct) / len(labels)
        return metrics

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """``samples.png``: one row per class, EMA weights, the configured sampler and guidance."""
        per_class = ctx.cfg.task.samples_per_class
        labels = torch.arange(ctx.data.num_classes, device=ctx.fabric.device).repeat_interleave(per_class)
        denoiser = ctx.ema if ctx.ema is not None else module.denoiser
        images = torch.cat([x for _, x in generate_chunks(module, denoiser, labels, ctx.cfg, ctx.fabric.device)])
        return [save_image_grid((images + 1) / 2, out_dir / "samples.png", nrow=per_class)]


def scores_samples(t: DictConfig) -> bool:
    """Whether evaluation generates samples and scores them: with a classifier (its features for FID, and sample
    accuracy) or with Inception features (FID only)."""
    return t.classifier_ckpt is not None or t.fid_features == "inception"


def real_image_fid(fabric: Any, classifier: ClassifierFeatures, loader: Any, data: DataInfo, t: DictConfig) -> Any:
    """A Fréchet-distance metric holding the feature statistics of the real test images, fed batch by batch."""
    fid = fabric.to_device(build_fid(t.fid_features, classifier, t.inception_weights,
                                     (data.in_chans, data.img_size, data.img_size), reset_real_features=False))
    for images, _ in loader:  # dataset-normalised -> [0, 1], in float32 whatever the training precision
        fid.update(to_unit_interval(images.float(), data.mean, data.std), real=True)
    return fid


def generate_chunks(module: DiffusionObjective, denoiser: nn.Module, labels: torch.Tensor, cfg: DictConfig,
                    device: torch.device, rank: int = 0, world_size: int = 1
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(labels, images)`` chunks of at most the eval batch size, images float32 in [-1, 1], (B, C, H, W): this
    process's share of ``labels`` (``pixelformer.diffusion.sample_chunks``: the set of samples depends on
    ``task.seed`` and the eval batch size, not on the number of processes), generated by ``denoiser`` on
    ``module``'s noise schedule and decoded by ``module`` (through its VAE for latent runs). The denoiser runs in
    eval mode (no label dropout) whatever mode it is in, and is put back afterwards.
    """
    t = cfg.task
    with eval_mode(denoiser):
        for _, chunk, generated in sample_chunks(
                denoiser, dict(module.scheduler.config), labels.to(device), module.sample_shape, t.sample_steps,
                t.cfg_scale, t.sampler, denoiser.num_classes, t.seed, eval_batch_size(cfg), rank, world_size,
                lambda: sampling_precision(device, cfg.trainer.precision)):
            yield chunk, module.decode(generated)


_HALF = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16-true": torch.float16,
         "16-mixed": torch.float16}


def sampling_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the run's half type around a float32 denoiser (the EMA), or nothing for 32-bit runs.

    Not ``fabric.autocast()``: under bf16-true that switches the default dtype instead, which a float32 EMA cannot
    take; autocast gives the same half-precision matmuls with float32 weights and inputs.
    """
    dtype = _HALF.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def load_for_sampling(path: str | Path, cfg_scale: Optional[float] = None) -> tuple[DiffusionObjective, DataInfo]:
    """A dit run's module with the EMA weights in its denoiser (float32, eval mode; ``module.decode`` turns what the
    denoiser generates into images, through the run's VAE for latent runs), and its data description. With
    ``cfg_scale``, refuses guidance that the checkpoint's training (no label dropout) cannot support."""
    from pixelformer.checkpoint import read_checkpoint
    from pixelformer.saved import load_run

    # The task is checked first: load_run's "no EMA weights" message suggests weights=model, which sampling has not.
    ckpt = read_checkpoint(path)
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    kind = saved.get("task", {}).get("name") if isinstance(saved.get("task"), dict) else None
    if kind != "dit":
        raise UserError(f"{path} is not a dit checkpoint (task {kind or 'unknown'}): sampling needs the checkpoint "
                        f"of a task=dit run")
    if not isinstance(ckpt.get("ema"), dict):
        raise UserError(f"{path} is not a dit checkpoint with EMA weights, which sampling uses (its run had no "
                        f"task.ema_decay): sample from a run trained with task.ema_decay set (DiT uses 0.9999)")
    cfg, info, task, module = load_run(path, weights="ema", ckpt=ckpt)
    if cfg_scale is not None and cfg.task.label_dropout == 0 and cfg_scale != 1:
        raise UserError(f"{path} was trained with task.label_dropout=0, so its null-class embedding is untrained and "
                        f"cfg_scale={cfg_scale} would guide with it: sample with cfg_scale=1.0, or train with "
                        f"task.label_dropout>0 (DiT uses 0.1)")
    return module, info


def __getattr__(name: str) -> Any:
    """``DiffusionTrainer``, the name before 2026-12 (it was never a trainer): still importable, with a warning."""
    if name == "DiffusionTrainer":
        warnings.warn("pixelformer.tasks.dit.DiffusionTrainer is now DiffusionObjective", DeprecationWarning,
                      stacklevel=2)
        return DiffusionObjective
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
