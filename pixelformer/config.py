"""Configuration: a dataclass schema per component, YAML layers under ``configs/``, dotlist overrides.

A run's config is composed as ``schema < configs/<group>/<choice>.yaml for each group < command-line overrides``::

    python tools/train.py task=mae model=pit_tiny data=cifar100 optim.lr=1e-3 trainer.max_steps=1000

``group=choice`` picks a YAML file of a group (``configs/model/`` may also name any registered backbone);
``a.b=value`` sets one key. A misspelt key or a badly typed value is an error naming the key and the closest valid
one, because every section is a structured (dataclass) config.

Interpolation: the YAML files and the command line may use OmegaConf's ``${...}``, e.g.
``run.dir=${oc.env:SCRATCH}/runs/a`` or ``data.root=${oc.env:HOME}/data``: they come from the user, whose shell can
read the same variables. Configs stored in checkpoints are saved resolved and read back literally
(:func:`compose_saved`): a ``${...}`` in a checkpoint from elsewhere stays plain text and is never expanded.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError, did_you_mean
from .task import TaskCfg, get_task, list_tasks

__all__ = [
    "CONFIG_DIR", "GROUPS", "Config", "DataCfg", "LoggerCfg", "ModelCfg", "OptimCfg", "RecipeCfg", "RunCfg", "TaskCfg",
    "TrainerCfg", "WandbCfg", "check_accumulation", "compose", "compose_saved", "eval_batch_size", "group_choices",
    "to_plain",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package (setup.cfg package_data)
GROUPS = ("task", "model", "data", "optim", "trainer", "logger", "recipe")


@dataclass
class ModelCfg:
    """Backbone name and architectural overrides; ``None`` keeps the registered default."""
    name: str = "pit_mini"
    patch_size: Optional[int] = None
    pos_embed: Optional[Literal["sincos", "learned", "none"]] = None
    pool: Optional[Literal["cls", "mean"]] = None
    # timm's pooling (token / avg / max / avgmax / map = attention pooling); None: from pool (cls -> token,
    # mean -> avg). Setting both to disagreeing values is an error.
    global_pool: Optional[Literal["token", "avg", "max", "avgmax", "map"]] = None
    class_token: Optional[bool] = None
    reg_tokens: Optional[int] = None  # register tokens (prefix tokens that are never pooled); None: 0
    # Normalise after pooling (timm's global_pool="avg", MAE fine-tuning) instead of every token before it;
    # None: on for pool=mean, off for pool=cls. false keeps the norm-then-mean of earlier pool=mean runs.
    fc_norm: Optional[bool] = None
    norm_eps: Optional[float] = None  # LayerNorm epsilon; None: 1e-6 (timm's ViT, MAE, DiT); 1e-5 = PyTorch default
    depth: Optional[int] = None
    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    drop_rate: Optional[float] = None
    attn_drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    patch_drop_rate: Optional[float] = None  # fraction of patch tokens dropped at random in training; None: 0
    init_values: Optional[float] = None  # layer scale: residual branches scaled by a learned vector from this value
    qk_norm: Optional[bool] = None  # LayerNorm on queries and keys per head; None: off
    # pit_local_* / pit_hourglass_* only (pixelformer/models/local_vit.py, hourglass.py); None: the registered default
    kernel: Optional[int] = None  # neighbourhood side of local attention (odd; 7)
    global_layers: Optional[list[int]] = None  # pit_local_*: blocks that keep global attention
    depths: Optional[list[int]] = None  # pit_hourglass_*: blocks per level, pixel level first, the last one global
    factors: Optional[list[int]] = None  # pit_hourglass_*: token-merge factor between levels
    attn_backend: Optional[Literal["auto", "flex", "tiled", "sdpa_mask"]] = None  # local attention kernel


@dataclass
class DataCfg:
    name: str = "digits"
    root: Optional[str] = None  # dataset root on disk (cifar10/cifar100/fashion_mnist/mnist/imagefolder)
    download: bool = False  # cifar, mnist: fetch the files into root when they are missing (needs internet)
    img_size: Optional[int] = None  # None: the dataset's native size (required for imagefolder)
    batch_size: int = 128  # per device, per micro-batch
    eval_batch_size: Optional[int] = None  # None: 2 x batch_size
    num_workers: int = 0
    # Hold the normalised images and labels on the training device and index batches there (no loader work per
    # step): for small in-memory datasets (digits, CIFAR) without augmentation.
    on_device: bool = False
    augment: Literal["none", "flip", "crop_flip", "rrc_flip", "mocov3", "randaugment"] = "none"
    rrc_scale_min: float = 0.2  # RandomResizedCrop lower scale for rrc_flip / mocov3 / randaugment
    limit_train: Optional[int] = None  # use only the first N training images (quick experiments, tests)
    limit_test: Optional[int] = None
    # A stratified subset of N training images, fixed by subset_seed (not run.seed: seeds then vary the model only)
    train_subset: Optional[int] = None
    subset_seed: int = 0
    # imagefolder: the most pixels an image file may have; None: PIL's guard against decompression bombs (about
    # 179 M pixels). Larger files are refused by name until this is raised.
    max_image_pixels: Optional[int] = None
    # Seed of one fixed random shuffle of the H*W pixel positions (after resizing and augmentation, the same for
    # every channel and image), applied to training and test images alike; None: pixels stay in place.
    permute_pixels: Optional[int] = None


@dataclass
class OptimCfg:
    name: Literal["adamw", "sgd", "lars"] = "adamw"  # lars: timm's LARS, MAE's linear-probing optimizer
    lr: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings and the CLS token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd and lars only
    fused: Optional[bool] = None  # None: fused AdamW where torch supports it on the device
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup, converted to steps
    warmup_steps: Optional[int] = None  # overrides warmup_epochs
    min_lr: float = 0.0  # floor of the cosine decay
    layer_decay: Optional[float] = None  # layer-wise lr decay (MAE fine-tuning uses 0.65-0.75): block i gets
    # lr * layer_decay ** (depth + 1 - (i + 1)); embeddings the least, the head the full lr


@dataclass
class TrainerCfg:
    accelerator: Literal["cpu", "gpu", "cuda", "mps", "auto"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # Seconds a process waits in a collective (all-reduce, barrier) for the others before the run stops with a
    # message: a process that died or hangs ends the run instead of blocking it for ever.
    dist_timeout_s: int = 1800
    # auto: bf16-mixed on bf16-capable GPUs, and on AMX CPUs for models >= 192 wide; else 32-true (see runtime.py)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    max_epochs: Optional[int] = 100
    max_steps: Optional[int] = None  # optimizer steps; overrides max_epochs
    accumulate_grad_batches: int = 1
    grad_clip: Optional[float] = 1.0  # max global grad norm; None turns clipping off
    skip_nonfinite_steps: int = 0  # tolerate this many NaN/inf steps (update skipped) before stopping the run
    eval_every_epochs: Optional[int] = 10
    eval_every_steps: Optional[int] = None  # overrides eval_every_epochs
    ckpt_every_steps: Optional[int] = None  # extra checkpoints between evaluations
    log_every_steps: int = 10
    progress_bar: bool = True
    compile: bool = False  # torch.compile the task module
    grad_checkpointing: bool = False  # recompute block activations in backward
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # CPU runs: "tuned" keeps freed tensor memory in the process (no page faults per step, see pixelformer/runtime.py);
    # "system" leaves glibc malloc at its defaults.
    cpu_allocator: Literal["tuned", "system"] = "tuned"
    # Refuse a run whose estimated training memory exceeds what the device has, before building the model
    # (pixelformer/runtime.py check_fits_memory; the estimate errs low, so only hopeless runs are refused).
    memory_check: bool = True


@dataclass
class RecipeCfg:
    """How a run spends its pixel tokens over training (pixelformer/recipe.py). The defaults (``recipe=plain``) train
    every token at full size every step; ``recipe=budget`` is the measured time-to-accuracy recipe. The schedule is a
    function of the step alone, so a run resumed in the middle of a phase continues it exactly."""
    name: str = "plain"
    # Share of each image's pixel tokens dropped at random in a training step. cls: in the backbone (timm's
    # PatchDropout; the CLS token is kept), which must support the "token_drop" part (pit_* / vit_*); mae: in the
    # decoder, which then reconstructs only 1 - token_drop of the masked tokens (the encoder is masked already).
    token_drop: float = 0.0
    # constant: token_drop until the full-token phase; linear: from token_drop down to 0 at its start
    token_drop_schedule: Literal["constant", "linear"] = "constant"
    # Progressive resolution: the first low_res_frac of the steps see images resized to low_res_scale x the side
    # (rounded to the patch size; the position table resampled on the fly, the same parameters); null: full size.
    low_res_scale: Optional[float] = None
    low_res_frac: float = 0.5
    # The last share of the steps at every token and full size, so the model is evaluated the way it last trained.
    full_frac: float = 0.0


@dataclass
class WandbCfg:
    mode: Literal["online", "offline", "disabled"] = "offline"
    project: str = "pixelformer"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerCfg:
    """W&B tracking; a local ``metrics.jsonl`` in the run directory is always written."""
    wandb: WandbCfg = field(default_factory=WandbCfg)
    log_checkpoints: bool = False  # upload last.ckpt / best.ckpt to W&B as model artifacts when they are written


@dataclass
class RunCfg:
    dir: Optional[str] = None  # None: runs/<task>-<model>-<data>-<timestamp>
    seed: int = 0


@dataclass
class Config:
    task: TaskCfg = field(default_factory=TaskCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)
    run: RunCfg = field(default_factory=RunCfg)
    recipe: RecipeCfg = field(default_factory=RecipeCfg)
    resume: Optional[str] = None  # "auto" (continue run.dir if it has a checkpoint) or a checkpoint path
    init_from: Optional[str] = None  # start the backbone from a checkpoint's encoder (e.g. MAE pretraining)


def group_choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The YAML choices of a group (for ``model``, registered backbones are valid choices too)."""
    choices = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
    if group == "model":
        from .models import list_backbones
        choices = sorted(set(choices) | set(list_backbones()))
    if group == "task":
        choices = list_tasks()
    return choices


def _split_args(args: list[str]) -> tuple[dict[str, str], list[str]]:
    choices: dict[str, str] = {}
    overrides: list[str] = []
    for arg in args:
        if "=" not in arg:
            raise UserError(f"cannot parse argument {arg!r}: use group=choice (e.g. model=pit_tiny) or key=value "
                            f"(e.g. optim.lr=1e-3); see --help")
        key, value = arg.split("=", 1)
        if key in GROUPS:
            choices[key] = value
        else:
            overrides.append(arg)
    return choices, overrides


def _load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends
        raise UserError(f"cannot parse {path}: {e}") from None
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path} must hold a mapping of keys to values")
    return cfg


def _group_layer(group: str, choice: str, config_dir: Path) -> DictConfig:
    valid = group_choices(group, config_dir)
    if choice not in valid:  # a name in the group, never a path: data=../task/cls would load another group's file
        hint = did_you_mean(choice, valid)
        raise UserError(f"unknown {group} {choice!r}.{hint} Choices: {', '.join(valid)}")
    path = config_dir / group / f"{choice}.yaml"
    content = _load_yaml(path) if path.exists() else OmegaConf.create({})  # a registered backbone without a file
    if group in ("model", "recipe") and "name" not in content:
        content.name = choice
    return OmegaConf.create({group: content})


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    where = f" (config key: {key})" if key else ""
    return f"config error: {first}{where}"


def _check_args(args: Any, what: str) -> list[str]:
    """``args`` as a list of strings, or a UserError: a string would be split into its characters, anything else
    would fail deep inside."""
    if isinstance(args, (str, bytes)) or not isinstance(args, (list, tuple)) or \
            not all(isinstance(a, str) for a in args):
        shown = repr(args) if len(repr(args)) <= 80 else repr(args)[:77] + "..."
        raise UserError(f"{what} takes a list of 'key=value' / 'group=choice' strings, e.g. "
                        f"['model=pit_tiny', 'optim.lr=1e-3'], got {shown}")
    return list(args)


def compose(args: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose a run config from ``group=choice`` and ``key=value`` command-line arguments."""
    args = _check_args(args, "compose()")
    choices, overrides = _split_args(args)
    defaults = _load_yaml(config_dir / "defaults.yaml").get("defaults", {})
    task_name = choices.get("task", defaults.get("task", "cls"))
    if task_name not in group_choices("task", config_dir):
        _group_layer("task", task_name, config_dir)  # raises the "unknown task" error with suggestions
        raise UserError(f"task {task_name!r} has a YAML file but no registered task plug-in in tasks/")
    task = get_task(task_name)
    task_file = config_dir / "task" / f"{task_name}.yaml"
    task_yaml = _load_yaml(task_file) if task_file.exists() else OmegaConf.create({})
    # A task may pick its own defaults for other groups (e.g. dit: a different optimizer); the command line wins.
    task_defaults = task_yaml.pop("defaults", {}) or {}
    resolved = {g: choices.get(g, task_defaults.get(g, defaults.get(g))) for g in GROUPS[1:]}
    layers = [_group_layer(g, c, config_dir) for g, c in resolved.items() if c is not None]
    layers.append(OmegaConf.create({"task": task_yaml}))
    return _merge(task.config_cls, task_name, layers, overrides)


def compose_saved(saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """Rebuild a run's config from the plain dict stored in its checkpoint, plus ``key=value`` overrides.

    The stored values are taken literally: a string holding ``${...}`` stays that string, so a checkpoint from
    elsewhere cannot make the tools read environment variables or other keys through interpolation. The overrides,
    which the user types, are interpolated as on the command line of ``compose``.
    """
    try:
        task_name = saved["task"]["name"]
    except (KeyError, TypeError):
        raise UserError("the checkpoint holds no pixelformer run config (config.task.name)") from None
    choices, overrides = _split_args(_check_args(overrides, "the overrides of a saved config"))
    if choices:
        raise UserError(f"{', '.join(f'{g}=' for g in choices)}: a saved run's config can only be changed key by key "
                        f"(e.g. data.img_size=16, data.root=...), not by picking another group file")
    task = get_task(task_name)
    saved = {**saved, "task": task.upgrade_config(dict(saved["task"]))}  # keys renamed since the run was saved
    return _merge(task.config_cls, task_name, [OmegaConf.create(_literal(saved))], overrides)


def _literal(value: Any) -> Any:
    """``value`` with every string escaped so that OmegaConf reads it verbatim: ``${...}`` is not interpolated.

    OmegaConf unescapes ``\\${`` to ``${`` and ``\\\\`` to ``\\`` in front of an interpolation, so a run of k
    backslashes before ``${`` becomes 2k backslashes and an escaped ``\\${``.
    """
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_literal(v) for v in value]
    return value


def _merge(task_cls: type, task_name: str, layers: list[DictConfig], overrides: list[str]) -> DictConfig:
    try:
        schema = OmegaConf.structured(Config)
        schema.task = OmegaConf.structured(task_cls)
        cfg = OmegaConf.merge(schema, *layers, OmegaConf.from_dotlist(overrides))
        cfg.task.name = task_name
    except OmegaConfBaseException as e:
        raise UserError(_format_omegaconf_error(e)) from None
    _check_interpolations(cfg)
    validate(cfg)
    return cfg


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every ``${...}`` once, so that one naming no key, an unset variable or itself is refused here with
    its key and text, not as a traceback wherever the value is first read. (``cfg`` is left as it is: resolving in
    place would turn a saved config's escaped, literal ``\\${`` into a live interpolation.)"""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        try:
            raw = OmegaConf.to_container(OmegaConf.select(cfg, key.rsplit(".", 1)[0]) if "." in key else cfg,
                                         resolve=False)
            text = raw.get(key.rsplit(".", 1)[-1]) if isinstance(raw, dict) else None
        except Exception:  # noqa: BLE001 - only for the message
            text = None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config error: cannot resolve {key}={text if text is not None else '...'} ({first}): a "
                        f"${{...}} must name another config key (e.g. ${{data.root}}) or a set environment variable "
                        f"(${{oc.env:NAME}}, or ${{oc.env:NAME,default}}); for a literal ${{ write \\${{") from None


def _in_range(value: float, low: float, high: float, *, low_open: bool = False, high_open: bool = True) -> bool:
    """Whether ``value`` lies in the interval; NaN never does (every comparison with it is False)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below


def validate(cfg: DictConfig) -> None:
    """Checks that the schema's types cannot express; each message names the key, its value and what to change.

    Conditions are written so that NaN fails them (``not x >= 0`` rather than ``x < 0``).
    """
    problems = [*_data_problems(cfg.data), *_model_problems(cfg.model), *_trainer_problems(cfg.trainer),
                *_optim_problems(cfg.optim), *recipe_problems(cfg.recipe)]
    if not 0 <= cfg.run.seed < 2 ** 32:
        problems.append(f"run.seed must be in [0, 2**32 - 1] (what numpy accepts), got {cfg.run.seed}")
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))


def _data_problems(data: DictConfig) -> list[str]:
    problems = []
    if data.batch_size <= 0:
        problems.append(f"data.batch_size must be positive, got {data.batch_size}")
    if data.eval_batch_size is not None and data.eval_batch_size <= 0:
        problems.append(f"data.eval_batch_size must be positive, got {data.eval_batch_size}")
    if data.img_size is not None and data.img_size <= 0:
        problems.append(f"data.img_size must be positive, got {data.img_size}")
    for key in ("limit_train", "limit_test", "train_subset"):
        if data[key] is not None and data[key] <= 0:
            problems.append(f"data.{key} must be a positive number of images (or null for all), got {data[key]}")
    if not 0 <= data.subset_seed < 2 ** 32:
        problems.append(f"data.subset_seed must be in [0, 2**32 - 1] (the seed of scikit-learn's stratified split), "
                        f"got {data.subset_seed}")
    if data.max_image_pixels is not None and data.max_image_pixels <= 0:
        problems.append(f"data.max_image_pixels must be a positive number of pixels (or null for PIL's limit), got "
                        f"{data.max_image_pixels}")
    if data.num_workers < 0:
        problems.append(f"data.num_workers must be >= 0 (0 loads in the training process), got {data.num_workers}")
    if not _in_range(data.rrc_scale_min, 0, 1, low_open=True, high_open=False):
        problems.append(f"data.rrc_scale_min must be in (0, 1] (the smallest crop's share of the image), got "
                        f"{data.rrc_scale_min}")
    if data.permute_pixels is not None and not 0 <= data.permute_pixels < 2 ** 63:
        problems.append(f"data.permute_pixels is the seed of a pixel permutation and must be in [0, 2**63) (or null "
                        f"for none), got {data.permute_pixels}")
    if data.on_device and data.name == "imagefolder":
        problems.append("data.on_device=true needs the whole dataset in memory, but imagefolder decodes files as it "
                        "goes: set data.on_device=false")
    if data.on_device and data.augment != "none":
        problems.append(f"data.on_device=true holds fixed, un-augmented images on the device, but data.augment="
                        f"{data.augment}: set data.augment=none or data.on_device=false")
    return problems


def _model_problems(model: DictConfig) -> list[str]:
    problems = []
    for key in ("depth", "embed_dim", "num_heads", "patch_size"):
        if model[key] is not None and model[key] <= 0:
            problems.append(f"model.{key} must be positive (or null for the model's default), got {model[key]}")
    if model.mlp_ratio is not None and not (model.mlp_ratio > 0 and math.isfinite(model.mlp_ratio)):
        problems.append(f"model.mlp_ratio must be positive (or null for the model's default), got {model.mlp_ratio}")
    for key in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
        if model[key] is not None and not _in_range(model[key], 0, 1):
            problems.append(f"model.{key} must be in [0, 1) (a probability; 0 turns it off), got {model[key]}")
    return problems


def _trainer_problems(trainer: DictConfig) -> list[str]:
    problems = []
    if trainer.max_steps is None and trainer.max_epochs is None:
        problems.append("set trainer.max_epochs or trainer.max_steps")
    for key in ("max_steps", "max_epochs", "eval_every_epochs", "eval_every_steps", "ckpt_every_steps"):
        value = trainer[key]
        if value is not None and value <= 0:
            problems.append(f"trainer.{key} must be positive (or null), got {value}")
    if trainer.log_every_steps <= 0:
        problems.append(f"trainer.log_every_steps must be positive, got {trainer.log_every_steps}")
    if trainer.skip_nonfinite_steps < 0:
        problems.append("trainer.skip_nonfinite_steps must be >= 0")
    if trainer.accumulate_grad_batches < 1:
        problems.append("trainer.accumulate_grad_batches must be >= 1")
    if trainer.devices < 1 or trainer.num_nodes < 1:
        problems.append("trainer.devices and trainer.num_nodes must be >= 1")
    if trainer.dist_timeout_s <= 0:
        problems.append(f"trainer.dist_timeout_s must be a positive number of seconds (default 1800), got "
                        f"{trainer.dist_timeout_s}")
    # A max norm of 0 zeroes every gradient and a negative one flips their sign (gradient ascent).
    if trainer.grad_clip is not None and not (trainer.grad_clip > 0 and math.isfinite(trainer.grad_clip)):
        problems.append(f"trainer.grad_clip must be a positive max gradient norm (null turns clipping off), got "
                        f"{trainer.grad_clip}")
    return problems


def _optim_problems(optim: DictConfig) -> list[str]:
    problems = []
    lr_ok = optim.lr > 0 and math.isfinite(optim.lr)
    if not lr_ok:
        problems.append(f"optim.lr must be a positive, finite number, got {optim.lr}")
    if not (optim.weight_decay >= 0 and math.isfinite(optim.weight_decay)):
        problems.append(f"optim.weight_decay must be >= 0 (0 turns it off), got {optim.weight_decay}")
    if lr_ok and not _in_range(optim.min_lr, 0, optim.lr, high_open=False):
        problems.append(f"optim.min_lr must be in [0, optim.lr={optim.lr}] (the floor of the cosine decay), got "
                        f"{optim.min_lr}")
    if optim.warmup_steps is not None and optim.warmup_steps < 0:
        problems.append(f"optim.warmup_steps must be >= 0 (or null to use optim.warmup_epochs), got "
                        f"{optim.warmup_steps}")
    if not (optim.warmup_epochs >= 0 and math.isfinite(optim.warmup_epochs)):
        problems.append(f"optim.warmup_epochs must be >= 0, got {optim.warmup_epochs}")
    if optim.layer_decay is not None and not 0 < optim.layer_decay <= 1:
        problems.append(f"optim.layer_decay must be in (0, 1], got {optim.layer_decay}")
    if len(optim.betas) != 2:
        problems.append(f"optim.betas needs two values, got {list(optim.betas)}")
    elif not all(_in_range(b, 0, 1) for b in optim.betas):
        problems.append(f"optim.betas must both be in [0, 1) (AdamW's decay rates, e.g. [0.9, 0.999]), got "
                        f"{list(optim.betas)}")
    if not _in_range(optim.momentum, 0, 1):
        problems.append(f"optim.momentum must be in [0, 1) (e.g. 0.9), got {optim.momentum}")
    return problems


def recipe_problems(recipe: DictConfig) -> list[str]:
    """The ``recipe.*`` values no schedule can follow, one message each (what the task and backbone support is
    checked when the run is built: :func:`pixelformer.recipe.check_recipe`)."""
    problems = []
    if not _in_range(recipe.token_drop, 0, 1):
        problems.append(f"recipe.token_drop must be in [0, 1) (the share of pixel tokens dropped; 0 turns it off), got "
                        f"{recipe.token_drop}")
    if recipe.low_res_scale is not None and not _in_range(recipe.low_res_scale, 0, 1, low_open=True):
        problems.append(f"recipe.low_res_scale must be in (0, 1) (e.g. 0.5 trains 28x28 images at 14x14 first), or "
                        f"null for full size throughout, got {recipe.low_res_scale}")
    if not _in_range(recipe.low_res_frac, 0, 1, high_open=False):
        problems.append(f"recipe.low_res_frac must be in [0, 1] (the share of the steps at low resolution), got "
                        f"{recipe.low_res_frac}")
    if not _in_range(recipe.full_frac, 0, 1, high_open=False):
        problems.append(f"recipe.full_frac must be in [0, 1] (the share of the last steps at every token and full "
                        f"size), got {recipe.full_frac}")
    elif recipe.low_res_scale is not None and _in_range(recipe.low_res_frac, 0, 1, high_open=False) \
            and recipe.low_res_frac + recipe.full_frac > 1:
        problems.append(f"recipe.low_res_frac={recipe.low_res_frac} + recipe.full_frac={recipe.full_frac} is more "
                        f"than every step: lower one of them")
    return problems


def check_accumulation(cfg: DictConfig, batches_per_epoch: int, num_images: int) -> None:
    """Refuse ``trainer.accumulate_grad_batches`` above the number of batches in an epoch.

    The loop steps at the end of every epoch, so such a step would sum fewer micro-batches than configured while
    each loss is still divided by the configured count: smaller gradients and a silently lower learning rate.
    Called by the training loop once the loader's length is known.
    """
    accum = cfg.trainer.accumulate_grad_batches
    if accum > batches_per_epoch:
        raise UserError(f"trainer.accumulate_grad_batches={accum} is more than the {batches_per_epoch} batches of an "
                        f"epoch ({num_images} training images, data.batch_size={cfg.data.batch_size} per process): "
                        f"set it to at most {batches_per_epoch} or lower data.batch_size")


def eval_batch_size(cfg: DictConfig) -> int:
    """The evaluation batch per process: ``data.eval_batch_size``, or twice the training batch (no gradients)."""
    return cfg.data.eval_batch_size or 2 * cfg.data.batch_size


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict: what checkpoints and loggers store (never a DictConfig, see weights_only loading)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
