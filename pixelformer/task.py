"""The task plug-in interface, its registry, and the few helpers every task shares.

A task is a stateless plug-in: a subclass of :class:`Task` decorated with ``@register_task``. The trainer
(``pixelformer.trainer``) owns Fabric, data loading, optimisation, the EMA, checkpoints and logging; a task supplies

* ``config_cls``: the dataclass of its ``task:`` config section (a subclass of :class:`TaskCfg`);
* ``build_module(cfg, data)``: an ``nn.Module`` whose ``forward(batch)`` returns a dict with a scalar ``"loss"``
  (Fabric wraps only ``forward``, so everything that must run under autocast/DDP happens there);
* ``evaluate(module, ctx)``: metrics on the test split, reduced over processes; ``ctx`` is an :class:`EvalContext`;
* optionally ``check`` (refuse a bad config before training), ``training_set`` (what the training loader draws
  from), ``visualize`` (pictures for the run directory and W&B, e.g. of ``ctx.details``), ``init_from`` (start from
  pretrained weights), ``monitored`` (the metric that picks ``best.ckpt``) and ``ema_target`` (the submodule whose
  exponential moving average the trainer keeps when ``task.ema_decay`` is set).

Whatever must live across evaluations of one run (an untrained baseline, a loaded FID classifier) goes in
``ctx.cache``, never on the task object: one task object may serve several runs in a process.

Where tasks come from: the built-in ones are the modules of ``pixelformer.tasks``; a package of your own registers
more through the ``pixelformer.tasks`` entry-point group (``name = your_package.your_module``). Adding a task touches
no other task.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError, did_you_mean

if TYPE_CHECKING:
    from lightning.fabric import Fabric
    from omegaconf import DictConfig
    from torch.utils.data import DataLoader, Dataset

    from .data import DataInfo

__all__ = ["EvalContext", "Task", "TaskCfg", "build_backbone", "check_backbone_parts", "eval_mode", "evaluate_classifier",
           "get_task", "keyed_batches", "list_tasks", "mean_loss", "register_task", "save_confusion_matrix",
           "save_image_grid", "seeded_batches", "untrained_baseline"]

ENTRY_POINT_GROUP = "pixelformer.tasks"
_TASKS: dict[str, type[Task]] = {}


@dataclass
class TaskCfg:
    """Base of every task's config section; each task subclasses it with its own fields."""
    name: str = "cls"


@dataclass
class EvalContext:
    """What an evaluation sees besides the module.

    ``loaders["test"]`` is the test split, ``loaders["train"]`` the training split without augmentation (for k-NN
    or probes); both are sharded over processes and yield batches on the device. ``ema`` is the averaged copy of
    the task's ``ema_target`` (float32, eval mode) when the run keeps one. ``cache`` lives as long as the run.

    ``details``: what the latest evaluation found besides its scalar metrics (e.g. a confusion matrix), as plain
    JSON values, identical on every process. Emptied before each evaluation; the trainer writes it into
    ``eval.json`` under ``"details"`` (so does ``tools/eval.py``) and ``visualize`` may draw it. Scalars that
    should be logged and plotted over training belong in the returned metrics instead.
    """
    fabric: Fabric
    cfg: DictConfig
    data: DataInfo
    loaders: dict[str, DataLoader]
    ema: Optional[nn.Module] = None
    cache: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class of a task plug-in. Subclasses set ``name`` and ``config_cls`` and define the two methods."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskCfg]] = TaskCfg
    #: The metric that selects ``best.ckpt``, and whether higher ("max") or lower ("min") is better.
    monitored: ClassVar[tuple[str, str]] = ("test/loss", "min")
    #: Submodule of the built module that the trainer averages (EMA) when ``cfg.task.ema_decay`` is set.
    ema_target: ClassVar[Optional[str]] = None
    #: The parts of the backbone contract (``pixelformer.models.backbone.PARTS``) the task needs; a backbone that
    #: lacks one is refused at config time (:func:`check_backbone_parts`). The built module names its backbone
    #: ``module.backbone``: what the analysis, ``init_from`` and the k-NN read.
    backbone_parts: ClassVar[tuple[str, ...]] = ("classify",)
    #: The token-budget levers (``pixelformer.recipe``: ``token_drop``, ``low_res``) the task's training follows;
    #: ``module(batch)`` must then accept a batch whose first element, the images, is resized.
    recipe_levers: ClassVar[tuple[str, ...]] = ()

    def monitor(self, cfg: DictConfig) -> tuple[str, str]:
        """``monitored``, unless the config changes what can be measured (e.g. DiT's FID needs a classifier)."""
        return self.monitored

    def check(self, cfg: DictConfig, data: DataInfo) -> None:
        """Refuse bad ``task.*`` values and missing files before training starts, one line each (the trainer calls
        this; loading a saved run does not, so a moved auxiliary file does not stop it)."""

    def build_module(self, cfg: DictConfig, data: DataInfo) -> nn.Module:
        """The trainable module; ``module(batch)`` returns ``{"loss": tensor, ...}``."""
        raise NotImplementedError

    def training_set(self, fabric: Fabric, cfg: DictConfig, module: nn.Module, train_set: Dataset) -> Dataset:
        """What the training loader draws from: ``train_set``, or a cache of what ``module`` would compute from each
        image (e.g. VAE latents)."""
        return train_set

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
        """Metrics, identical on every process (the trainer runs this in eval mode, without gradients)."""
        raise NotImplementedError

    def visualize(self, module: nn.Module, ctx: EvalContext, out_dir: Path, step: int) -> list[Path]:
        """Write pictures of the model's behaviour into ``out_dir`` (rank 0 only); returns their paths."""
        return []

    def upgrade_config(self, saved: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's ``task:`` section as this version names its keys (a task that renames a key maps the old
        name here, so runs saved before still load)."""
        return saved

    def init_from(self, module: nn.Module, path: str) -> dict[str, list[str]]:
        """Initialise from pretrained weights (``init_from=``): by default the encoder, ``module.backbone``."""
        from .checkpoint import load_backbone_weights

        if not isinstance(getattr(module, "backbone", None), nn.Module):
            raise UserError(f"init_from={path}: task {self.name} has no encoder to initialise and does not support "
                            f"init_from; drop it to train from scratch")
        return load_backbone_weights(module.backbone, path)


# ------------------------------------------------------------------------------------------------ registry
def register_task(cls: type[Task]) -> type[Task]:
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is registered twice ({_TASKS[cls.name]} and {cls})")
    _TASKS[cls.name] = cls
    return cls


def _import_tasks() -> None:
    """Import the modules that define tasks: those named in the ``pixelformer.tasks`` entry-point group (the
    built-in ones are declared there by setup.cfg), and the built-in package itself for a checkout that is used
    without being installed. Importing a module registers its tasks."""
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        importlib.import_module(entry.value.split(":")[0])
    importlib.import_module(f"{__package__}.tasks")  # by name: the library does not depend on its plug-ins


def list_tasks() -> list[str]:
    _import_tasks()
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    _import_tasks()
    if name not in _TASKS:
        hint = did_you_mean(name, _TASKS)
        raise UserError(f"unknown task {name!r}.{hint} Choices: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]()


# ------------------------------------------------------------------------------------------ shared helpers
def build_backbone(cfg: DictConfig, data: DataInfo, num_classes: int = 0, **defaults: Any) -> nn.Module:
    """The configured backbone (``cfg.model``) sized for ``data``, for any task that needs an encoder; model errors
    (e.g. a size the patches cannot tile) are the user's.

    ``defaults`` replace the registered defaults of model keys that the config leaves unset (``None``).
    """
    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    overrides.update({k: v for k, v in defaults.items() if overrides.get(k) is None})
    from .models import create_backbone

    try:
        model = create_backbone(cfg.model.name, img_size=data.img_size, in_chans=data.in_chans,
                                num_classes=num_classes, **overrides)
    except ValueError as e:
        raise UserError(f"cannot build model {cfg.model.name} for {data.name} "
                        f"({data.img_size}x{data.img_size}x{data.in_chans}): {e}") from None
    if isinstance(getattr(model, "pretrained_cfg", None), dict):  # timm's data config: the data's normalisation
        model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(data.mean), "std": tuple(data.std)}
        model.default_cfg = model.pretrained_cfg
    return model


def check_backbone_parts(cfg: DictConfig, data: DataInfo, parts: tuple[str, ...], task: str) -> None:
    """Refuse, in one line, a backbone that lacks a part of the contract the task needs. The backbone is built on the
    meta device (no memory, no init); a config it cannot be built from is left to the real build to report."""
    from .models import create_backbone, require

    overrides = {k: v for k, v in cfg.model.items() if k != "name"}
    try:
        with torch.device("meta"):
            model = create_backbone(cfg.model.name, img_size=data.img_size, in_chans=data.in_chans, **overrides)
    except (ValueError, TypeError, UserError):
        return
    require(model, parts, task, cfg.model.name)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, drop path or label dropout) for the block, then back in its own mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def keyed_batches(loader: Any) -> Iterator[tuple[Any, Optional[list[tuple[int, int]]]]]:
    """``(batch, keys)`` of a loader built by :func:`pixelformer.data.build_loader`: each sample's ``(seed, index)``
    from the loader's sampler; the seed depends on the run seed and the sample's index in the split alone (not on
    the rank). Another loader (whose sampler yields no such pairs) gets ``None``."""
    keys = list(getattr(loader, "sampler", None) or ())
    if not keys or not all(isinstance(k, tuple) for k in keys):
        keys = None
    start = 0
    for batch in loader:
        count = len(batch[1])
        yield batch, keys[start:start + count] if keys is not None else None
        start += count


def seeded_batches(loader: Any) -> Iterator[tuple[Any, Optional[list[int]]]]:
    """``(batch, seeds)``: :func:`keyed_batches` with each sample's seed alone (``None``: draws from the process
    stream)."""
    for batch, keys in keyed_batches(loader):
        yield batch, [seed for seed, _ in keys] if keys is not None else None


def mean_loss(fabric: Fabric, module: nn.Module, loader: DataLoader) -> float:
    """The module's ``"loss"`` averaged over every image of a (sharded) split, weighted by batch size.

    The module's random draws (MAE's masks, DiT's noise and timesteps) are made per sample
    (:func:`pixelformer.rng.per_sample_seeds`), so the value does not change with the number of processes.
    """
    from .rng import per_sample_seeds

    totals = torch.zeros(2, device=fabric.device, dtype=torch.float64)  # loss sum, image count
    for batch, seeds in seeded_batches(loader):
        count = len(batch[1])
        with per_sample_seeds(seeds):
            totals[0] += module(batch)["loss"].double() * count
        totals[1] += count
    totals = fabric.all_reduce(totals, reduce_op="sum")
    return (totals[0] / totals[1].clamp(min=1)).item()


def untrained_baseline(ctx: EvalContext, build: Callable[[], nn.Module],
                       score: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    """``score`` of a freshly initialised model (``build()``, seeded with ``run.seed``), computed once per run:
    what a metric reads before any training, printed next to the trained value."""
    if "untrained_baseline" not in ctx.cache:
        torch.manual_seed(ctx.cfg.run.seed)
        fresh = ctx.fabric.to_device(build()).eval()
        ctx.cache["untrained_baseline"] = score(fresh)
    return ctx.cache["untrained_baseline"]


def save_image_grid(images: torch.Tensor, path: Path, nrow: int, min_side: int = 32) -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid, ``nrow`` per row; images narrower than ``min_side``
    are enlarged by the integer factor ``min_side // width`` (nearest neighbour), so tiny images can be read."""
    from torchvision.utils import save_image

    scale = max(1, min_side // images.shape[-1])
    images = torch.nn.functional.interpolate(images.detach().float().cpu(), scale_factor=scale, mode="nearest")
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


# ------------------------------------------------------------------------------------------ classifiers
def evaluate_classifier(module: nn.Module, ctx: EvalContext) -> dict[str, float]:
    """Test loss, top-1 and top-5 accuracy (%) of a module whose ``forward(batch)`` returns ``"logits"`` (B, classes),
    summed over every process; the confusion matrix and per-class top-1 go to ``ctx.details``.

    ``ctx.details`` gets ``confusion_matrix`` (classes x classes counts, rows the true class, columns the
    prediction), ``per_class_acc1`` (% of each class's test images classified right; ``None`` for a class with no
    test image, where torchmetrics would report 0) and ``class_names``. torchmetrics keeps them and sums them over
    processes in ``compute()``; the predictions they count are the top-1 of ``test/acc1``, so the matrix's trace is
    its count exactly.
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    fabric, num_classes = ctx.fabric, ctx.data.num_classes
    per_class = MetricCollection({"confusion": MulticlassConfusionMatrix(num_classes),
                                  "accuracy": MulticlassAccuracy(num_classes, average=None)}).to(fabric.device)
    totals = torch.zeros(4, device=fabric.device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    for batch in ctx.loaders["test"]:
        logits, labels = module(batch)["logits"].float(), batch[1]
        topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += (topk[:, 0] == labels).sum()
        totals[2] += (topk == labels[:, None]).any(dim=1).sum()
        totals[3] += labels.numel()
        per_class.update(topk[:, 0], labels)
    totals = fabric.all_reduce(totals, reduce_op="sum")
    found = per_class.compute()  # every process joins: torchmetrics gathers the other processes' counts here
    confusion, accuracy = found["confusion"].cpu(), found["accuracy"].cpu()
    seen = confusion.sum(dim=1) > 0
    ctx.details.update(
        confusion_matrix=confusion.tolist(),
        per_class_acc1=[100 * a if s else None for a, s in zip(accuracy.tolist(), seen.tolist())],
        class_names=list(ctx.data.class_names) or [str(i) for i in range(num_classes)])
    count = totals[3].clamp(min=1)
    return {"test/loss": (totals[0] / count).item(), "test/acc1": (100 * totals[1] / count).item(),
            "test/acc5": (100 * totals[2] / count).item()}


#: Above this many classes the confusion-matrix picture leaves out the counts in its cells (they would not fit).
CONFUSION_TEXT_MAX_CLASSES = 20


def save_confusion_matrix(details: dict[str, Any], path: Path) -> Optional[Path]:
    """Draw ``details["confusion_matrix"]`` (from :func:`evaluate_classifier`) as a PNG with torchmetrics' plot,
    counts in the cells up to ``CONFUSION_TEXT_MAX_CLASSES`` classes; ``None`` when the details hold no matrix.

    On a matplotlib ``Figure`` of its own rather than pyplot's, so drawing neither needs a display nor touches the
    figures of a notebook the run lives in.
    """
    if "confusion_matrix" not in details:
        return None
    from matplotlib.figure import Figure
    from torchmetrics.utilities.plot import plot_confusion_matrix

    matrix = torch.tensor(details["confusion_matrix"])
    n = len(matrix)
    side = min(max(6.0, 0.6 * n), 24.0)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.add_subplot()
    with warnings.catch_warnings():  # torchmetrics hands imshow a tensor, whose __array__ predates numpy 2's copy=
        warnings.filterwarnings("ignore", message="__array__ implementation", category=DeprecationWarning)
        plot_confusion_matrix(matrix, ax=ax, add_text=n <= CONFUSION_TEXT_MAX_CLASSES,
                              labels=details.get("class_names"))
    ax.set_title("confusion matrix on the test split")
    fig.savefig(path, dpi=80)
    return path
