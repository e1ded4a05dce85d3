"""Configuration: a dataclass schema per component, YAML layers under ``configs/``, dotlist overrides.

A run's config is composed as ``schema < configs/<group>/<choice>.yaml for each group < command-line overrides``::

    python tools/train.py task=mae model=pit_tiny data=cifar100 optim.lr=1e-3 trainer.max_steps=1000

``group=choice`` picks a YAML file of a group (``configs/model/`` may also name any registered backbone);
``a.b=value`` sets one key. A misspelt key or a badly typed value is an error naming the key and the closest valid
one, because every section is a structured (dataclass) config.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError

__all__ = [
    "CONFIG_DIR", "GROUPS", "Config", "DataCfg", "LoggerCfg", "ModelCfg", "OptimCfg", "RunCfg", "TaskCfg",
    "TrainerCfg", "WandbCfg", "compose", "compose_saved", "group_choices", "saved_run", "to_plain",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
GROUPS = ("task", "model", "data", "optim", "trainer", "logger")


@dataclass
class TaskCfg:
    """Base of every task's config section; each task subclasses it with its own fields."""
    name: str = "cls"


@dataclass
class ModelCfg:
    """Backbone name and architectural overrides; ``None`` keeps the registered default."""
    name: str = "pit_mini"
    patch_size: Optional[int] = None
    pos_embed: Optional[Literal["sincos", "learned", "none"]] = None
    pool: Optional[Literal["cls", "mean"]] = None
    class_token: Optional[bool] = None
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


@dataclass
class DataCfg:
    name: str = "digits"
    root: Optional[str] = None  # dataset root on disk (cifar10/cifar100/imagefolder)
    download: bool = False  # cifar only: fetch the files into root when they are missing (needs internet)
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


@dataclass
class OptimCfg:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate, reached after warmup
    weight_decay: float = 0.05  # not applied to biases, norms, position embeddings and the CLS token
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    fused: Optional[bool] = None  # None: fused AdamW where torch supports it on the device
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup, converted to steps
    warmup_steps: Optional[int] = None  # overrides warmup_epochs
    min_lr: float = 0.0  # floor of the cosine decay
    layer_decay: Optional[float] = None  # layer-wise lr decay (MAE fine-tuning uses 0.65-0.75): block i gets
    # lr * layer_decay ** (depth + 1 - (i + 1)); embeddings the least, the head the full lr


@dataclass
class TrainerCfg:
    accelerator: str = "auto"  # cpu | gpu | cuda | mps | auto
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
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
    resume: Optional[str] = None  # "auto" (continue run.dir if it has a checkpoint) or a checkpoint path
    init_from: Optional[str] = None  # start the backbone from a checkpoint's encoder (e.g. MAE pretraining)


def group_choices(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The YAML choices of a group (for ``model``, registered backbones are valid choices too)."""
    choices = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
    if group == "model":
        from .models import list_backbones
        choices = sorted(set(choices) | set(list_backbones()))
    if group == "task":
        from .task import list_tasks
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
    path = config_dir / group / f"{choice}.yaml"
    if path.exists():
        content = _load_yaml(path)
    elif group == "model" and choice in group_choices("model", config_dir):
        content = OmegaConf.create({})
    else:
        valid = group_choices(group, config_dir)
        close = difflib.get_close_matches(choice, valid, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"unknown {group} {choice!r}.{hint} Choices: {', '.join(valid)}")
    if group == "model" and "name" not in content:
        content.name = choice
    return OmegaConf.create({group: content})


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    where = f" (config key: {key})" if key else ""
    return f"config error: {first}{where}"


def compose(args: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose a run config from ``group=choice`` and ``key=value`` command-line arguments."""
    from .task import get_task

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
    """Rebuild a run's config from the plain dict stored in its checkpoint, plus ``key=value`` overrides."""
    from .task import get_task

    try:
        task_name = saved["task"]["name"]
    except (KeyError, TypeError):
        raise UserError("the checkpoint holds no pixelformer run config (config.task.name)") from None
    choices, overrides = _split_args(overrides)
    if choices:
        raise UserError(f"{', '.join(f'{g}=' for g in choices)}: a saved run's config can only be changed key by key "
                        f"(e.g. data.img_size=16, data.root=...), not by picking another group file")
    return _merge(get_task(task_name).config_cls, task_name, [OmegaConf.create(saved)], overrides)


def saved_run(ckpt: dict[str, Any], overrides: list[str] = ()) -> tuple[DictConfig, Any]:
    """The run config (with overrides) and the ``DataInfo`` stored in a checkpoint.

    Checkpoints record the data's shape and normalisation; older ones are re-derived from the data config.
    """
    from .data import DataInfo, build_datasets

    cfg = compose_saved(ckpt.get("config", {}), list(overrides))
    info = DataInfo(**ckpt["data_info"]) if "data_info" in ckpt else build_datasets(cfg.data)[2]
    return cfg, info


def _merge(task_cls: type, task_name: str, layers: list[DictConfig], overrides: list[str]) -> DictConfig:
    try:
        schema = OmegaConf.structured(Config)
        schema.task = OmegaConf.structured(task_cls)
        cfg = OmegaConf.merge(schema, *layers, OmegaConf.from_dotlist(overrides))
        cfg.task.name = task_name
    except OmegaConfBaseException as e:
        raise UserError(_format_omegaconf_error(e)) from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that the schema's types cannot express; each message says what to change."""
    problems = []
    if cfg.data.batch_size <= 0:
        problems.append(f"data.batch_size must be positive, got {cfg.data.batch_size}")
    if cfg.data.eval_batch_size is not None and cfg.data.eval_batch_size <= 0:
        problems.append(f"data.eval_batch_size must be positive, got {cfg.data.eval_batch_size}")
    if cfg.data.img_size is not None and cfg.data.img_size <= 0:
        problems.append(f"data.img_size must be positive, got {cfg.data.img_size}")
    if cfg.data.on_device and cfg.data.name == "imagefolder":
        problems.append("data.on_device=true needs the whole dataset in memory, but imagefolder decodes files as it "
                        "goes: set data.on_device=false")
    if cfg.data.on_device and cfg.data.augment != "none":
        problems.append(f"data.on_device=true holds fixed, un-augmented images on the device, but data.augment="
                        f"{cfg.data.augment}: set data.augment=none or data.on_device=false")
    if cfg.trainer.max_steps is None and cfg.trainer.max_epochs is None:
        problems.append("set trainer.max_epochs or trainer.max_steps")
    for key in ("max_steps", "max_epochs", "eval_every_epochs", "eval_every_steps", "ckpt_every_steps"):
        value = cfg.trainer[key]
        if value is not None and value <= 0:
            problems.append(f"trainer.{key} must be positive (or null), got {value}")
    if cfg.trainer.skip_nonfinite_steps < 0:
        problems.append("trainer.skip_nonfinite_steps must be >= 0")
    if cfg.trainer.accumulate_grad_batches < 1:
        problems.append("trainer.accumulate_grad_batches must be >= 1")
    if cfg.trainer.devices < 1 or cfg.trainer.num_nodes < 1:
        problems.append("trainer.devices and trainer.num_nodes must be >= 1")
    if cfg.optim.lr <= 0:
        problems.append(f"optim.lr must be positive, got {cfg.optim.lr}")
    if cfg.optim.layer_decay is not None and not 0 < cfg.optim.layer_decay <= 1:
        problems.append(f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if len(cfg.optim.betas) != 2:
        problems.append(f"optim.betas needs two values, got {list(cfg.optim.betas)}")
    if problems:
        raise UserError("invalid config:\n  - " + "\n  - ".join(problems))


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict: what checkpoints and loggers store (never a DictConfig, see weights_only loading)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
