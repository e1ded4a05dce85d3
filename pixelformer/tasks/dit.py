"""Class-conditional diffusion in pixel space with a DiT-style denoiser on pixel tokens.

Training: epsilon-prediction MSE on ``DDPMScheduler.add_noise`` samples, label dropout for classifier-free guidance,
an EMA of the denoiser (saved in checkpoints, used for evaluation and sampling). Evaluation: the diffusion loss on
the test split and, with ``task.classifier_ckpt`` (a ``cls`` checkpoint of the same data), the Fréchet distance
between generated and real test images on that classifier's features and its accuracy on the samples given their
conditioning labels, next to the same numbers for an untrained denoiser.

diffusers provides no variational-bound loss, so the variance is not learned here (``learn_sigma`` is refused).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import TaskCfg, eval_batch_size
from pixelformer.data import DataInfo
from pixelformer.diffusion import build_train_scheduler, ema_copy, sample, update_ema
from pixelformer.errors import CheckpointError, UserError
from pixelformer.layers import is_sincos_table, resize_pos_embed
from pixelformer.metrics import ClassifierFeatures, build_fid, load_classifier
from pixelformer.models import DiT, create_dit
from pixelformer.task import Task, eval_mode, register_task


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
    try:
        return create_dit(model.name, img_size=data.img_size, in_chans=data.in_chans, num_classes=data.num_classes,
                          patch_size=model.patch_size, depth=model.depth, embed_dim=model.embed_dim,
                          num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, pos_embed=model.pos_embed,
                          norm_eps=model.norm_eps, class_dropout_prob=cfg.task.label_dropout)
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
    expected = denoiser.state_dict()
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
              "model.num_heads, model.patch_size, model.pos_embed) on data with the same channels."
        )
    denoiser.load_state_dict(loaded, strict=False)
    return {"loaded": sorted(loaded), "dropped": [], "reinitialised": sorted(reinitialised),
            "matched_fixed": matched, "source": [source]}


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
        check_task_config(t)
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

    def init_from(self, module: nn.Module, path: str) -> dict[str, list[str]]:
        """Start the denoiser (and so its EMA) from another DiT's weights; see :func:`load_denoiser_weights`."""
        state, source = denoiser_state(read_checkpoint(path), path)
        return load_denoiser_weights(module.denoiser, state, source)

    def extra_state(self, fabric: Fabric, module: nn.Module) -> dict[str, nn.Module]:
        if self.ema is None:  # DiT's recipe: the EMA starts as an exact copy (kept in float32, see ema_copy)
            self.ema = ema_copy(module.module.denoiser)
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
        fid = self.real_image_fid(fabric, loaders["test"], cfg)
        metrics.update(self.sample_metrics(fabric, self.ema, fid, cfg, ""))
        if cfg.task.untrained_baseline:
            if self._baseline is None:
                torch.manual_seed(cfg.run.seed)
                fresh = fabric.to_device(build_denoiser(cfg, self.info)).eval()
                self._baseline = self.sample_metrics(fabric, fresh, fid, cfg, "_untrained")
            metrics.update(self._baseline)
        return metrics

    def real_image_fid(self, fabric: Fabric, loader: DataLoader, cfg: DictConfig):
        """A Fréchet-distance metric holding the feature statistics of the real test images, fed batch by batch."""
        t = cfg.task
        shape = (self.info.in_chans, self.info.img_size, self.info.img_size)
        fid = fabric.to_device(build_fid(t.fid_features, fabric.to_device(self.classifier), t.inception_weights,
                                         shape, reset_real_features=False))
        mean = torch.tensor(self.info.mean, device=fabric.device, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std, device=fabric.device, dtype=torch.float32).view(1, -1, 1, 1)
        for images, _ in loader:  # dataset-normalised -> [0, 1], in float32 whatever the training precision
            fid.update((images.float() * std + mean).clamp(0, 1), real=True)
        return fid

    def sample_metrics(self, fabric: Fabric, denoiser: nn.Module, fid, cfg: DictConfig,
                       suffix: str) -> dict[str, float]:
        """FID between samples and the real images already in ``fid``, and the classifier's accuracy on the samples.

        Samples are generated, scored and dropped one chunk at a time: memory does not grow with
        ``task.num_eval_samples``.
        """
        t = cfg.task
        fid.reset()  # drops the previous samples' statistics, keeps the real images' (reset_real_features=False)
        classifier = fabric.to_device(self.classifier)
        labels = torch.arange(t.num_eval_samples, device=fabric.device) % self.info.num_classes
        correct = 0
        for chunk, fake in self.generate_chunks(fabric, denoiser, labels, cfg):
            fake01 = (fake + 1) / 2
            fid.update(fake01, real=False)
            correct += int((classifier.logits(fake01).argmax(dim=1) == chunk).sum())
        return {f"test/fid{suffix}": float(fid.compute()), f"test/sample_acc{suffix}": 100.0 * correct / len(labels)}

    def generate(self, fabric: Fabric, denoiser: nn.Module, labels: torch.Tensor, cfg: DictConfig) -> torch.Tensor:
        """Images in [-1, 1], (len(labels), C, H, W): all chunks of :meth:`generate_chunks` (for small sets)."""
        return torch.cat([images for _, images in self.generate_chunks(fabric, denoiser, labels, cfg)])

    def generate_chunks(self, fabric: Fabric, denoiser: nn.Module, labels: torch.Tensor,
                        cfg: DictConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(labels, images)`` chunks of at most the eval batch size, images float32 in [-1, 1], (B, C, H, W).

        One generator over all chunks: the samples depend on ``task.seed`` and the eval batch size. The denoiser
        runs in eval mode (no label dropout) whatever mode it is in, and is put back afterwards.
        """
        t = cfg.task
        generator = torch.Generator(fabric.device).manual_seed(t.seed)
        shape = (self.info.in_chans, self.info.img_size, self.info.img_size)
        with eval_mode(denoiser):
            for chunk in labels.split(eval_batch_size(cfg)):
                with sampling_precision(fabric.device, cfg.trainer.precision):
                    images = sample(denoiser, self.scheduler_config, chunk, shape, t.sample_steps, t.cfg_scale,
                                    t.sampler, self.info.num_classes, generator).float()
                yield chunk, images

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


_HALF = {"bf16-true": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16-true": torch.float16,
         "16-mixed": torch.float16}


def sampling_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the run's half type around a float32 denoiser (the EMA), or nothing for 32-bit runs.

    Not ``fabric.autocast()``: under bf16-true that switches the default dtype instead, which a float32 EMA cannot
    take; autocast gives the same half-precision matmuls with float32 weights and inputs.
    """
    dtype = _HALF.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def load_for_sampling(path: str | Path, cfg_scale: Optional[float] = None) -> tuple[DiT, DataInfo, dict]:
    """The EMA denoiser of a dit checkpoint (float32, eval mode), its data description and its training noise
    schedule. With ``cfg_scale``, refuses guidance that the checkpoint's training (no label dropout) cannot support."""
    from pixelformer.checkpoint import check_state_dict
    from pixelformer.config import saved_run

    ckpt = read_checkpoint(path)
    if ckpt.get("config", {}).get("task", {}).get("name") != "dit" or "ema" not in ckpt:
        raise UserError(f"{path} is not a dit checkpoint (no EMA denoiser in it)")
    cfg, info = saved_run(ckpt)
    if cfg_scale is not None and cfg.task.label_dropout == 0 and cfg_scale != 1:
        raise UserError(f"{path} was trained with task.label_dropout=0, so its null-class embedding is untrained and "
                        f"cfg_scale={cfg_scale} would guide with it: sample with cfg_scale=1.0, or train with "
                        f"task.label_dropout>0 (DiT uses 0.1)")
    denoiser = build_denoiser(cfg, info)
    check_state_dict(denoiser, ckpt["ema"], f"{path} (ema)")
    denoiser.load_state_dict(ckpt["ema"])
    scheduler = build_train_scheduler(cfg.task.num_train_timesteps, cfg.task.beta_schedule)
    return denoiser.eval(), info, dict(scheduler.config)
