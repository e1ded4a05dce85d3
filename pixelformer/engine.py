"""The training engine shared by every task: Fabric set-up, the loop, evaluation, checkpoints and resume.

The loop in :func:`fit` is plain PyTorch written against Fabric: ``module(batch)`` returns a loss dict,
``fabric.backward``, gradient clipping, ``optimizer.step``, a step-based LR schedule. A task plugs in through
:class:`pixelformer.task.Task`; nothing here knows which task runs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (capture_rng_state, check_state_dict, fsync_and_replace, read_checkpoint,
                         restore_rng_state)
from .config import compose_saved, to_plain
from .data import build_datasets, build_loader
from .errors import UserError
from .loggers import build_loggers
from .optim import build_optimizer, build_scheduler
from .runtime import auto_precision, check_fits_memory, tune_cpu_allocator
from .task import Task, get_task

__all__ = ["CHECKPOINT_FORMAT", "NonFiniteLossError", "build_fabric", "evaluate_checkpoint", "fit", "resolve_precision",
           "resolve_run_dir"]

CHECKPOINT_FORMAT = "pixelformer-checkpoint/1"
_RUN_DIR_ENV = "PIXELFORMER_RUN_DIR"  # shares the run directory with processes that Fabric launches


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; the run stops before applying the bad update."""


# -------------------------------------------------------------------------------------------- run directory
def resolve_run_dir(cfg: DictConfig) -> Path:
    """Fill ``cfg.run.dir`` (default ``runs/<task>-<model>-<data>-<timestamp>``) identically on every process."""
    if cfg.run.dir is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if _RUN_DIR_ENV not in os.environ and world_size > 1:
            # torchrun / `fabric run` start every process at once: separate timestamps would split the run.
            raise UserError(f"this process is one of {world_size} started by an external launcher (torchrun, "
                            f"fabric run, SLURM): set run.dir=<shared path> so that they all write one run")
        if _RUN_DIR_ENV not in os.environ:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            os.environ[_RUN_DIR_ENV] = f"runs/{cfg.task.name}-{cfg.model.name}-{cfg.data.name}-{stamp}"
        cfg.run.dir = os.environ[_RUN_DIR_ENV]
    return Path(cfg.run.dir).expanduser()


def _resolve_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume is None:
        if last.exists():
            raise UserError(f"run directory {run_dir} already holds a run ({last}): pass resume=auto to continue it, "
                            f"or choose a new run.dir")
        return None
    if cfg.resume == "auto":
        return last if last.exists() else None
    path = Path(cfg.resume).expanduser()
    if not path.is_file():
        raise UserError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto with run.dir=<run> to pick "
                        f"up <run>/checkpoints/last.ckpt)")
    return path


def _make_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove it writable before anything expensive starts."""
    try:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run directory {run_dir} ({e.strerror}): set run.dir to a writable "
                        f"path") from None


def _prepare_run_dir(run_dir: Path, cfg: DictConfig, resume_step: Optional[int]) -> None:
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        # Fresh start: begin a new file. Resume: drop what was logged after the checkpoint, it is logged again.
        keep = []
        if resume_step is not None:
            for line in metrics.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line + "\n")
                except (ValueError, TypeError):  # a line cut short by a kill
                    continue
        metrics.write_text("".join(keep))


def _summarise(keys: list[str], shown: int = 6) -> str:
    if not keys:
        return "nothing"
    return ", ".join(keys[:shown]) + (f" ... ({len(keys)} in all)" if len(keys) > shown else "")


# ------------------------------------------------------------------------------------------------- fabric
def _model_width(cfg: DictConfig) -> int:
    """The configured backbone's token width, read off a copy built on the meta device (no memory, no init)."""
    from .models import create_backbone

    overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    try:
        with torch.device("meta"):
            return int(create_backbone(cfg.model.name, **overrides).embed_dim)
    except (ValueError, TypeError, KeyError):  # the real build reports the problem, with the data's sizes
        return 0


def resolve_precision(cfg: DictConfig) -> str:
    """Replace ``trainer.precision=auto`` by what is fastest for this device and model (``runtime.auto_precision``).

    The resolved value is what the run's saved config holds, so a resumed run keeps it.
    """
    trainer = cfg.trainer
    if trainer.precision == "auto":
        cuda = trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        trainer.precision = auto_precision("cuda" if cuda else "cpu", _model_width(cfg))
    return trainer.precision


def build_fabric(cfg: DictConfig, loggers: Optional[list] = None) -> Fabric:
    trainer = cfg.trainer
    resolve_precision(cfg)
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if trainer.cpu_allocator == "tuned" and on_cpu:
        tune_cpu_allocator()  # before the first large tensor: see pixelformer/runtime.py
    strategy: Any = trainer.strategy
    if strategy == "fsdp":
        # One consolidated file per checkpoint, like every other strategy.
        strategy = FSDPStrategy(state_dict_type="full")
    try:
        return Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                      strategy=strategy, precision=trainer.precision, loggers=loggers)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"cannot set up Fabric with trainer.accelerator={trainer.accelerator} devices="
                        f"{trainer.devices} strategy={trainer.strategy} precision={trainer.precision}: {e}") from None


def _rng_devices(fabric: Fabric) -> list:
    return [fabric.device] if fabric.device.type == "cuda" else []


def _eval_loaders(fabric: Fabric, cfg: DictConfig, train_set, test_set) -> dict[str, Any]:
    """The test split and the un-augmented training split, sharded over processes, batches moved to the device."""
    batch = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    device = fabric.device if cfg.data.on_device else None
    loaders = {name: build_loader(ds, batch, False, cfg.run.seed, fabric.global_rank, fabric.world_size,
                                  cfg.data.num_workers, device)
               for name, ds in (("test", test_set), ("train", train_set.without_augmentation()))}
    if cfg.data.on_device:
        return loaders  # their batches are on the device already
    return dict(zip(loaders, fabric.setup_dataloaders(*loaders.values(), use_distributed_sampler=False)))


def _evaluate(fabric: Fabric, task: Task, module: nn.Module, loaders: dict[str, Any],
              cfg: DictConfig) -> dict[str, float]:
    # Evaluation must not move the training RNG streams, or a resumed run would diverge from an uninterrupted one.
    with torch.random.fork_rng(devices=_rng_devices(fabric)):
        torch.manual_seed(cfg.run.seed)  # and is itself repeatable (e.g. MAE's masks on the test split)
        module.eval()
        with torch.no_grad():
            metrics = task.evaluate(fabric, module, loaders, cfg)
        module.train()
    return metrics


def _save(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Atomic checkpoint: written to a temporary file on every process's behalf, then renamed by rank 0."""
    tmp = path.with_name(path.name + ".tmp")
    fabric.save(tmp, {**state, "rng": capture_rng_state()})
    fabric.barrier()
    if fabric.is_global_zero:
        fsync_and_replace(tmp, path)
    fabric.barrier()


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    fsync_and_replace(tmp, dst)


def _load_for_resume(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a pixelformer training checkpoint (format {ckpt.get('format')!r}), so a run "
                        f"cannot be resumed from it")
    check_state_dict(state["model"], ckpt["model"], str(path), resizable=())
    missing = [k for k in state if k not in ckpt and k != "rng"]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it was written by another task "
                        f"({ckpt.get('config', {}).get('task', {}).get('name')}) and cannot resume this one")
    rng = ckpt["rng"]
    del ckpt
    remainder = fabric.load(path, state)
    remainder.pop("rng", None)
    restore_rng_state(rng)


# ---------------------------------------------------------------------------------------------------- fit
def fit(cfg: DictConfig) -> dict[str, float]:
    """Train ``cfg.task`` as configured; returns the final test metrics (also written to ``eval.json``)."""
    task = get_task(cfg.task.name)
    resolve_precision(cfg)  # before the config is saved or logged: runs record what they ran with
    run_dir = resolve_run_dir(cfg)
    resume_path = _resolve_resume(cfg, run_dir)
    _make_run_dir(run_dir)
    loggers = build_loggers(cfg, run_dir, run_dir.name)
    fabric = build_fabric(cfg, loggers)
    fabric.launch()
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    fabric.seed_everything(cfg.run.seed, verbose=False)

    train_set, test_set, info = build_datasets(cfg.data)
    check_fits_memory(cfg, info, fabric.device)
    with fabric.init_module():
        module = task.build_module(cfg, info)
    if cfg.init_from and resume_path is None:
        report = task.init_from(module, cfg.init_from)
        fabric.print(f"init_from {cfg.init_from}: loaded {len(report['loaded'])} tensors; dropped "
                     f"{_summarise(report['dropped'])}; re-initialised {_summarise(report['reinitialised'])}")
    if cfg.trainer.grad_checkpointing:
        for sub in module.modules():
            if hasattr(sub, "set_grad_checkpointing"):
                sub.set_grad_checkpointing(True)
    optimizer = build_optimizer(module, cfg.optim, fabric.device)

    batch_size, accum = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    train_loader = build_loader(train_set, batch_size, True, cfg.run.seed, fabric.global_rank, fabric.world_size,
                                cfg.data.num_workers, fabric.device if cfg.data.on_device else None)
    if len(train_loader) == 0:
        raise UserError(f"the training split has {len(train_set)} images, fewer than one batch per process")
    sampler = train_loader.sampler
    batches_per_epoch = len(train_loader)
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = cfg.trainer.max_steps or cfg.trainer.max_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps, steps_per_epoch)

    backbone = getattr(module, "backbone", None)
    tokens = f", {backbone.patch_embed.num_patches} tokens/image" if hasattr(backbone, "patch_embed") else ""
    num_params = sum(p.numel() for p in module.parameters())
    if cfg.trainer.compile:
        module = torch.compile(module)
    module, optimizer = fabric.setup(module, optimizer)
    if not cfg.data.on_device:  # a DeviceTensorLoader's batches are on the device already
        train_loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=False)
    eval_loaders = _eval_loaders(fabric, cfg, train_set, test_set)

    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best": None}
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "model": module, "optimizer": optimizer, "scheduler": scheduler,
        **task.extra_state(fabric, module), "progress": progress, "config": to_plain(cfg),
        "data_info": dataclasses.asdict(info),
    }
    if resume_path is not None:
        _load_for_resume(fabric, resume_path, state)
        progress = state["progress"]
        fabric.print(f"resumed from {resume_path} at step {progress['step']} (epoch {progress['epoch']})")
    state["config"] = to_plain(cfg)  # the running config, not the one loaded from the checkpoint
    if fabric.is_global_zero:
        _prepare_run_dir(run_dir, cfg, progress["step"] if resume_path else None)
        for logger in fabric.loggers:
            logger.log_hyperparams(state["config"])
    fabric.barrier()

    ckpt_dir = run_dir / "checkpoints"
    monitor, mode = task.monitor
    fabric.print(f"task={cfg.task.name} model={cfg.model.name} ({num_params / 1e6:.2f} M params{tokens}) "
                 f"data={cfg.data.name} "
                 f"({len(train_set)} train / {len(test_set)} test, {info.img_size}x{info.img_size}x{info.in_chans}) "
                 f"steps={total_steps} precision={cfg.trainer.precision} devices={fabric.world_size}\n"
                 f"run dir: {run_dir}")

    def evaluate_and_checkpoint(final: bool = False) -> dict[str, float]:
        metrics = _evaluate(fabric, task, module, eval_loaders, cfg)
        step = progress["step"]
        metrics["epoch"] = progress["epoch"]
        fabric.log_dict(metrics, step=step)
        value = metrics.get(monitor)
        improved = value is not None and (progress["best"] is None or
                                          (value > progress["best"] if mode == "max" else value < progress["best"]))
        if improved:
            progress["best"] = value
        _save(fabric, ckpt_dir / "last.ckpt", state)
        if improved and fabric.is_global_zero:
            _copy_atomic(ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt")
        if fabric.is_global_zero:
            with torch.random.fork_rng(devices=_rng_devices(fabric)):
                # Rank 0 alone: use the unwrapped module, whose forward runs no collective (DDP buffer syncs).
                paths = task.visualize(fabric, module.module, eval_loaders, cfg, run_dir, step)
            for path in paths:
                for logger in fabric.loggers:
                    if hasattr(logger, "log_image"):
                        logger.log_image(key=path.stem, images=[str(path)], step=step)
        summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
        fabric.print(f"{'final' if final else 'eval'} step {step} epoch {progress['epoch']}: {summary}")
        return metrics

    eval_every_steps, eval_every_epochs = cfg.trainer.eval_every_steps, cfg.trainer.eval_every_epochs
    log_every, ckpt_every = cfg.trainer.log_every_steps, cfg.trainer.ckpt_every_steps
    max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip is not None else float("inf")
    images_per_step = batch_size * accum * fabric.world_size
    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", dynamic_ncols=True,
               disable=not (fabric.is_global_zero and cfg.trainer.progress_bar))
    sums: dict[str, torch.Tensor] = {}
    window_micro, window_steps, window_start = 0, 0, time.perf_counter()
    module.train()
    while progress["step"] < total_steps:
        start = progress["batches_in_epoch"]  # > 0 only when resuming in the middle of an epoch
        sampler.set_position(progress["epoch"], skip=start * batch_size)
        micro = 0
        for index, batch in enumerate(train_loader, start=start):
            micro += 1
            accumulating = micro < accum and index < batches_per_epoch - 1
            with fabric.no_backward_sync(module, enabled=accumulating):
                out = module(batch)
                fabric.backward(out["loss"] / accum)
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.ndim == 0:
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
            window_micro += 1
            if accumulating:
                continue
            # Gradients are all-reduced by now, so every process sees the same norm and stops together.
            grad_norm = fabric.clip_gradients(module, optimizer, max_norm=max_norm, error_if_nonfinite=False)
            if not torch.isfinite(grad_norm):
                progress["skipped_steps"] = progress.get("skipped_steps", 0) + 1
                if progress["skipped_steps"] <= cfg.trainer.skip_nonfinite_steps:
                    optimizer.zero_grad(set_to_none=True)  # drop this batch's update, keep going
                    fabric.print(f"warning: non-finite loss or gradients at step {progress['step'] + 1}; update "
                                 f"skipped ({progress['skipped_steps']}/{cfg.trainer.skip_nonfinite_steps} allowed)")
                    sums, window_micro, micro = {}, 0, 0
                    continue
                last = ckpt_dir / "last.ckpt"
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at step {progress['step'] + 1} (loss {out['loss'].item():.4g}); "
                    f"the run stopped before applying that update. Last good checkpoint: "
                    f"{last if last.exists() else 'none written yet'}. Lower optim.lr, set trainer.grad_clip, use "
                    f"trainer.precision=32-true or trainer.skip_nonfinite_steps=N, then resume=auto."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress["step"] += 1
            progress["batches_in_epoch"] = index + 1
            task.on_train_step_end(module, progress["step"])
            step, micro = progress["step"], 0
            window_steps += 1
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm.detach().float()
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                logged = {f"train/{k}": (v / (window_steps if k == "grad_norm" else window_micro)).item()
                          for k, v in sums.items()}
                logged["train/lr"] = optimizer.param_groups[0]["lr"]
                logged["train/images_per_sec"] = window_steps * images_per_step / max(elapsed, 1e-9)
                logged["epoch"] = progress["epoch"]
                fabric.log_dict(logged, step=step)
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}")
                sums, window_micro, window_steps, window_start = {}, 0, 0, time.perf_counter()
            if step >= total_steps:
                break
            if eval_every_steps and step % eval_every_steps == 0:
                evaluate_and_checkpoint()
            elif ckpt_every and step % ckpt_every == 0:
                _save(fabric, ckpt_dir / "last.ckpt", state)
        else:
            progress["epoch"] += 1
            progress["batches_in_epoch"] = 0
            if not eval_every_steps and eval_every_epochs and progress["epoch"] % eval_every_epochs == 0 \
                    and progress["step"] < total_steps:
                evaluate_and_checkpoint()
    bar.close()

    if progress["batches_in_epoch"] >= batches_per_epoch:  # the last step ended an epoch
        progress["epoch"] += 1
        progress["batches_in_epoch"] = 0
    metrics = evaluate_and_checkpoint(final=True)
    result = {k: v for k, v in metrics.items()}
    if fabric.is_global_zero:
        report = {"metrics": result, "step": progress["step"], "epoch": progress["epoch"],
                  "best": {monitor: progress["best"]}, "checkpoint": str(ckpt_dir / "last.ckpt")}
        (run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        for logger in fabric.loggers:
            logger.finalize("success")
    return result


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str]) -> tuple[dict[str, float], DictConfig, Any]:
    """Evaluate a saved model on its test split; ``overrides`` change the saved config (e.g. ``data.img_size=16``,
    where a learned position embedding is resized to the new grid)."""
    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a pixelformer checkpoint (no 'config' and 'model' entries)")
    cfg = compose_saved(ckpt["config"], overrides)
    task = get_task(cfg.task.name)
    fabric = build_fabric(cfg)
    fabric.launch()
    train_set, test_set, info = build_datasets(cfg.data)
    module = task.build_module(cfg, info)
    check_state_dict(module, ckpt["model"], str(path))
    module.load_state_dict(ckpt["model"])
    module = fabric.setup_module(module)
    for name, obj in task.extra_state(fabric, module).items():  # e.g. the EMA weights that evaluation uses
        if name in ckpt:
            obj.load_state_dict(ckpt[name])
    return _evaluate(fabric, task, module, _eval_loaders(fabric, cfg, train_set, test_set), cfg), cfg, info
