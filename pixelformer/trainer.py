"""The training loop shared by every task, in the spirit of Lightning Fabric's examples.

:meth:`Trainer.fit` is the whole loop, top to bottom. The pieces it calls each do one thing:

* :class:`Progress`: the counters that must survive (step, epoch, position in the epoch, best metric), a plain
  container with ``state_dict()``, saved in every checkpoint;
* :class:`pixelformer.run.Checkpointer`: atomic ``last.ckpt``, the ``best.ckpt`` copy, resume, the format tag;
* :meth:`Trainer.micro_step` / :meth:`Trainer.optimizer_step`: forward/backward, clipping, the non-finite check;
* :class:`MetricsWindow`: the training values averaged between two log lines (checkpointed too);
* :meth:`Trainer.evaluate`: the task's metrics, the best copy, pictures; :meth:`Trainer.finish`: ``eval.json``.

A task plugs in through :class:`pixelformer.task.Task`; nothing here knows which task runs. An exponential moving
average of the task's ``ema_target`` is kept here (timm's ``ModelEmaV3``) when ``task.ema_decay`` is set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from timm.utils import ModelEmaV3
from torch import nn

from .config import check_accumulation, eval_batch_size, to_plain
from .data import build_datasets, build_loader
from .distributed import EqualBatches, full_parameters, is_sharded
from .errors import UserError
from .console import ProgressLog, print_stderr
from .optim import build_optimizer, build_scheduler
from .recipe import TokenBudget, check_recipe, levers_in_use
from .rng import seed_process_streams
from .run import Checkpointer, prepare_run_files
from .runtime import check_fits_memory, leave_signals_to_main
from .task import EvalContext, Task, check_backbone_parts, eval_mode

__all__ = ["EMA", "MetricsWindow", "NonFiniteLossError", "Progress", "Trainer", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/inf; the run stops before applying the bad update."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after an optimizer step, and ``last.ckpt`` holds that step.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C keeps working. ``exit_code`` is 128 + the signal number
    (143 for SIGTERM, 130 for SIGINT): what a shell reports for a process the signal ended.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Progress:
    """Where the run is. ``best``/``best_step``: the best monitored value and its step; ``window``: the
    :class:`MetricsWindow` sums at the last checkpoint, so a resumed run logs what an uninterrupted one would."""
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best: Optional[float] = None
    best_step: Optional[int] = None
    skipped_steps: int = 0
    processes: int = 0  # the number of processes that counted batches_in_epoch (0: checkpoints from before)
    overflow_steps: int = 0  # 16-mixed: steps the loss scaler skipped (gradients overflowed float16), in all
    consecutive_overflows: int = 0
    window: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for key, value in state.items():  # older checkpoints lack some counters: they keep their defaults
            if key in names:
                setattr(self, key, value)

    def improves(self, value: Optional[float], mode: str) -> bool:
        return value is not None and (self.best is None or (value > self.best if mode == "max" else value < self.best))


class MetricsWindow:
    """Sums of the logged training values since the last log line; only throughput is timed afresh on resume.

    Each process sums its own micro-batches; what is logged, and what a checkpoint keeps, is the mean over
    processes (a sum is linear, so a resumed window that starts from the mean ends at the same mean)."""

    def __init__(self, fabric: Fabric) -> None:
        self.fabric, self.device = fabric, fabric.device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.micro = self.steps = self.timed_steps = 0
        self.start = time.perf_counter()

    def add_micro_batch(self, out: Mapping[str, Any]) -> None:
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                self.sums[key] = self.sums.get(key, 0.0) + value.detach().float()
        self.micro += 1

    def add_step(self, grad_norm: torch.Tensor) -> None:
        self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm.detach().float()
        self.steps += 1
        self.timed_steps += 1

    def mean_sums(self) -> dict[str, torch.Tensor]:
        """The sums averaged over processes (every process calls this at the same step: it is a collective)."""
        if self.fabric.world_size == 1 or not self.sums:
            return self.sums
        keys = sorted(self.sums)  # every process logs the same keys: its module returns the same outputs
        stacked = torch.stack([torch.as_tensor(self.sums[k], device=self.device, dtype=torch.float32) for k in keys])
        return dict(zip(keys, self.fabric.all_reduce(stacked, reduce_op="mean").unbind()))

    def averages(self, images_per_step: int) -> dict[str, float]:
        logged = {f"train/{k}": (v / (self.steps if k == "grad_norm" else self.micro)).item()
                  for k, v in self.mean_sums().items()}
        elapsed = time.perf_counter() - self.start
        logged["train/images_per_sec"] = self.timed_steps * images_per_step / max(elapsed, 1e-9)
        return logged

    def state_dict(self) -> dict[str, Any]:
        # float32 sums round-trip exactly through Python floats
        return {"sums": {k: float(v) for k, v in self.mean_sums().items()}, "micro": self.micro,
                "steps": self.steps}

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        if state:  # checkpoints written before the window was saved have none
            self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["sums"].items()}
            self.micro, self.steps = state["micro"], state["steps"]


class EMA(ModelEmaV3):
    """timm's ``ModelEmaV3`` kept in float32, with DiT's warm-up (diffusers' ``EMAModel`` default): the decay at
    step ``s`` is ``min(decay, (1 + s) / (10 + s))``, so early averages are not dominated by the initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, decay=decay, dtype=torch.float32)
        self.module.requires_grad_(False)

    def get_decay(self, step: Optional[int] = None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


def planned_steps(trainer: Mapping[str, Any], steps_per_epoch: int) -> int:
    return trainer["max_steps"] or trainer["max_epochs"] * steps_per_epoch


class Trainer:
    """One run of one task: built by :func:`pixelformer.engine.fit` once Fabric is launched; :meth:`fit` trains."""

    def __init__(self, fabric: Fabric, cfg: DictConfig, task: Task, run_dir: Path, stop: Any) -> None:
        self.fabric, self.cfg, self.task, self.run_dir, self.stop = fabric, cfg, task, run_dir, stop
        self.progress = Progress()
        self.window = MetricsWindow(fabric)
        self.monitor, self.mode = task.monitor(cfg)
        self.log = ProgressLog(fabric, cfg.trainer)
        self.ema: Optional[EMA] = None
        self.scaler = loss_scaler(fabric)
        self.budget: Optional[TokenBudget] = None

    # ---------------------------------------------------------------------------------------------- the loop
    def fit(self, resume_path: Optional[Path], saved: Optional[Mapping[str, Any]],
            show_config: bool = False) -> dict[str, float]:
        finished = self.setup(resume_path, saved, show_config)
        if finished is not None:
            return finished
        p, accum = self.progress, self.cfg.trainer.accumulate_grad_batches
        self.log.start(self.total_steps, p.step)
        self.window.start = time.perf_counter()  # throughput counts training, not the set-up
        self.module.train()
        while p.step < self.total_steps:
            micro = 0
            for index, batch in self.epoch_batches():
                micro += 1
                if self.micro_step(batch, accumulating=micro < accum and index < self.batches_per_epoch - 1):
                    continue
                micro = 0
                if not self.optimizer_step(batch_index=index):
                    continue  # a non-finite update was skipped
                if p.step >= self.total_steps:
                    break
                if self.due(self.cfg.trainer.eval_every_steps):
                    self.evaluate()
                elif self.due(self.cfg.trainer.ckpt_every_steps):
                    self.checkpointer.save_last()
                signum = self.stop.requested()
                if signum is not None:
                    raise self.interrupted(signum)
            else:  # the epoch ran to its end
                p.epoch, p.batches_in_epoch = p.epoch + 1, 0
                every = self.cfg.trainer.eval_every_epochs
                if not self.cfg.trainer.eval_every_steps and every and p.epoch % every == 0 \
                        and p.step < self.total_steps:
                    self.evaluate()
        return self.finish()

    # ---------------------------------------------------------------------------------------------- set-up
    def setup(self, resume_path: Optional[Path], saved: Optional[Mapping[str, Any]],
              show_config: bool) -> Optional[dict[str, float]]:
        """Data, module, optimizer, schedule, loaders, EMA and checkpointer; resumes from ``resume_path``.
        Returns the recorded metrics instead when ``resume_path`` is this run's finished final checkpoint."""
        fabric, cfg, task = self.fabric, self.cfg, self.task
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        fabric.seed_everything(cfg.run.seed, verbose=False)
        train_set, test_set, self.data = build_datasets(cfg.data)
        check_fits_memory(cfg, self.data, fabric.device)
        check_backbone_parts(cfg, self.data, task.backbone_parts, task.name)
        task.check(cfg, self.data)
        module = self.build_module(initialise=resume_path is None)
        sharded_scaler = cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "16-mixed"
        optimizer = build_optimizer(module, cfg.optim, fabric.device, fused_allowed=not sharded_scaler)

        steps_per_epoch = self.plan_steps(module, train_set)
        if saved is not None:
            finished = self.check_resumed_length(saved, resume_path, steps_per_epoch)
            if finished is not None:
                return finished
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.total_steps, steps_per_epoch)
        self.budget = TokenBudget(cfg.recipe, self.total_steps, self.data.img_size,
                                  module.backbone.patch_embed.patch_size) if levers_in_use(cfg.recipe) else None
        self.raw_module = module  # the unwrapped module: its parameters are the ones Fabric's wrapper trains
        decay = cfg.task.get("ema_decay")
        if task.ema_target is not None and decay is not None:  # DiT's recipe: the EMA starts as an exact copy
            # before the module is set up: FSDP would leave only this process's shard of each parameter to copy
            self.ema = EMA(module.get_submodule(task.ema_target), decay)
            self.ema.module.to(fabric.device)  # FSDP builds the module on the CPU and moves it when wrapping
        # the full parameter shapes, which a resumed checkpoint must have (FSDP's own parameters are shards)
        expected = {k: v.to("meta") for k, v in module.state_dict().items()}
        if cfg.trainer.compile:
            module = torch.compile(module)
        self.module, self.optimizer = fabric.setup(module, optimizer)
        if not cfg.data.on_device:  # a DeviceTensorLoader's batches are on the device already
            self.train_loader = fabric.setup_dataloaders(self.train_loader, use_distributed_sampler=False)
        self.eval_loaders = eval_loaders(fabric, cfg, train_set, test_set)
        self.context = EvalContext(fabric, cfg, self.data, self.eval_loaders,
                                   self.ema.module if self.ema is not None else None)

        state: dict[str, Any] = {
            "model": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler,
            **({"ema": self.ema.module} if self.ema is not None else {}),
            **({"scaler": self.scaler} if self.scaler is not None else {}),
            "progress": self.progress, "config": to_plain(cfg), "data_info": dataclasses.asdict(self.data),
        }
        self.checkpointer = Checkpointer(fabric, self.run_dir, state, self.progress, self.window,
                                         (self.raw_module, expected))
        if resume_path is not None:
            self.checkpointer.resume(resume_path)
            fabric.print(f"resumed from {resume_path} at step {self.progress.step} (epoch {self.progress.epoch})")
        state["config"] = to_plain(cfg)  # the running config, not the one loaded from the checkpoint
        if fabric.is_global_zero:
            prepare_run_files(self.run_dir, cfg, self.progress.step if resume_path else None,
                              final_again=self.progress.step >= self.total_steps)
            for logger in fabric.loggers:
                logger.log_hyperparams({**state["config"], "architecture": self.architecture})
        fabric.barrier()
        self.announce(show_config, len(train_set), len(test_set))
        return None

    def build_module(self, initialise: bool) -> nn.Module:
        """The task's module, checked against the recipe, started from ``init_from`` (unless resuming), with
        gradient checkpointing as configured; each process's random streams are split from here on."""
        fabric, cfg, task = self.fabric, self.cfg, self.task
        with fabric.init_module():
            module = task.build_module(cfg, self.data)
        if levers_in_use(cfg.recipe):
            check_recipe(cfg.recipe, task.name, task.recipe_levers, module, cfg.model.name,
                         self.data.img_size)
        if cfg.init_from and initialise:
            fabric.print(init_report(cfg.init_from, task.init_from(module, cfg.init_from)))
        # Initialisation above drew from run.seed on every rank alike; from here each process draws its own masks,
        # noise, timesteps and dropout (rank 0 keeps the one-process stream: pixelformer/rng.py).
        seed_process_streams(cfg.run.seed, fabric.global_rank)
        if cfg.trainer.grad_checkpointing:
            for sub in module.modules():
                if hasattr(sub, "set_grad_checkpointing"):
                    sub.set_grad_checkpointing(True)
        self.architecture = describe_module(module)
        return module

    def plan_steps(self, module: nn.Module, train_set: Any) -> int:
        """The training loader, its sampler and the run's length (``total_steps``); returns the steps per epoch."""
        fabric, cfg = self.fabric, self.cfg
        train_data = self.task.training_set(fabric, cfg, module, train_set)
        self.train_loader = leave_signals_to_main(build_loader(
            train_data, cfg.data.batch_size, True, cfg.run.seed, fabric.global_rank, fabric.world_size,
            cfg.data.num_workers, fabric.device if cfg.data.on_device else None))
        if len(self.train_loader) == 0:
            raise UserError(f"the training split has {len(train_set)} images, fewer than one batch per process")
        self.sampler, self.batches_per_epoch = self.train_loader.sampler, len(self.train_loader)
        check_accumulation(cfg, self.batches_per_epoch, len(train_set))
        steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.trainer.accumulate_grad_batches)
        self.total_steps = planned_steps(cfg.trainer, steps_per_epoch)
        return steps_per_epoch

    def check_resumed_length(self, saved: Mapping[str, Any], resume_path: Optional[Path],
                             steps_per_epoch: int) -> Optional[dict[str, float]]:
        """Refuse a resume that would shorten the run; the recorded metrics when the run has already finished."""
        cfg = self.cfg
        planned = planned_steps(saved["config"]["trainer"], steps_per_epoch)
        if self.total_steps < planned:
            raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} max_epochs={cfg.trainer.max_epochs} give "
                            f"{self.total_steps} steps, fewer than the {planned} that {resume_path} was training "
                            f"for: a resumed run may be made longer, not shorter; revert them, or start a new "
                            f"run.dir")
        finished = finished_run(self.run_dir, resume_path, saved["progress"]["step"], self.total_steps)
        if finished is not None:
            self.fabric.print(f"run {self.run_dir} has finished (step {saved['progress']['step']}, eval.json): its "
                              f"recorded metrics are returned; raise trainer.max_steps or trainer.max_epochs to "
                              f"train it further")
        return finished

    def announce(self, show_config: bool, train_images: int, test_images: int) -> None:
        """The config (when asked) and one line on what trains, on what, for how long, and where."""
        fabric, cfg = self.fabric, self.cfg
        if show_config and fabric.is_global_zero:
            print(OmegaConf.to_yaml(cfg), end="---\n")
        a, d = self.architecture, self.data
        arch = (f"model={cfg.model.name}: {a['depth']} blocks x {a['width']} wide x {a['heads']} heads, "
                f"{a['tokens']} tokens/image, " if "depth" in a else "(no transformer): ")
        fabric.print(f"task={cfg.task.name} {arch}{a['params'] / 1e6:.2f} M params | "
                     f"data={cfg.data.name} ({train_images} train / {test_images} test, "
                     f"{d.img_size}x{d.img_size}x{d.in_chans}) | steps={self.total_steps} "
                     f"precision={cfg.trainer.precision} devices={fabric.world_size}\nrun dir: {self.run_dir}")
        if self.budget is not None:
            fabric.print(self.budget.describe())

    # ----------------------------------------------------------------------------------------------- steps
    def epoch_batches(self) -> Iterator[tuple[int, Any]]:
        """``(index in epoch, batch)`` of the current epoch, from where a resumed run stopped in it.

        The samples already trained on are counted over all processes, so a run resumed on another number of
        processes goes on with the epoch's unseen samples; its indices are counted so that the epoch's last batch
        keeps the index ``batches_per_epoch - 1``."""
        p, world = self.progress, self.fabric.world_size
        start = p.batches_in_epoch  # > 0 only when resuming in the middle of an epoch
        self.sampler.set_position(p.epoch, skip=start * self.cfg.data.batch_size * (p.processes or world))
        if p.processes not in (0, world):
            start = max(self.batches_per_epoch - len(self.train_loader), 0)
        p.processes = world
        return enumerate(self.train_loader, start=start)

    def micro_step(self, batch: Any, accumulating: bool) -> bool:
        """Forward and backward of one micro-batch; returns ``accumulating`` (no optimizer step yet)."""
        if self.budget is not None:  # this step's token drop and image size (a function of the step: resumable)
            batch = self.budget.apply(self.raw_module, batch, self.progress.step)
        with self.fabric.no_backward_sync(self.module, enabled=accumulating):
            self.out = self.module(batch)
            self.fabric.backward(self.out["loss"] / self.cfg.trainer.accumulate_grad_batches)
        self.window.add_micro_batch(self.out)
        return accumulating

    def optimizer_step(self, batch_index: int) -> bool:
        """Clip, check, step. A non-finite gradient norm skips the update (up to ``trainer.skip_nonfinite_steps``
        times) or stops the run before applying it; returns whether the step was taken. With a loss scaler
        (16-mixed) an overflow is the scaler's business: see :meth:`overflow`."""
        p, trainer = self.progress, self.cfg.trainer
        max_norm = trainer.grad_clip if trainer.grad_clip is not None else float("inf")
        # Gradients are all-reduced by now, so every process sees the same norm and stops together.
        grad_norm = clip_gradients(self.fabric, self.module, self.optimizer, max_norm)
        if self.scaler is not None and not torch.isfinite(grad_norm):
            return self.overflow()
        if not torch.isfinite(grad_norm):
            p.skipped_steps += 1
            if p.skipped_steps > trainer.skip_nonfinite_steps:
                last = self.checkpointer.last
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at step {p.step + 1} (loss {self.out['loss'].item():.4g}); the "
                    f"run stopped before applying that update. Last good checkpoint: "
                    f"{last if last.exists() else 'none written yet'}. Set trainer.grad_clip, "
                    f"trainer.precision=32-true or trainer.skip_nonfinite_steps=N and resume=auto, or train with a "
                    f"lower optim.lr in a new run.dir.")
            self.optimizer.zero_grad(set_to_none=True)  # drop this batch's update, keep going
            self.log.line(f"warning: non-finite loss or gradients at step {p.step + 1}; update skipped "
                          f"({p.skipped_steps}/{trainer.skip_nonfinite_steps} allowed)")
            self.window.reset()
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        p.step, p.batches_in_epoch, p.consecutive_overflows = p.step + 1, batch_index + 1, 0
        self.after_step(grad_norm)
        return True

    def overflow(self) -> bool:
        """16-mixed: the scaled gradients overflowed float16. ``optimizer.step()`` goes through the scaler, which
        skips the update and halves the scale (GradScaler's own recipe); the step is not counted. Only
        ``MAX_CONSECUTIVE_OVERFLOWS`` in a row (the scale fell ~2^24-fold: the loss itself is not finite) stop the
        run like a NaN."""
        p = self.progress
        p.overflow_steps, p.consecutive_overflows = p.overflow_steps + 1, p.consecutive_overflows + 1
        if p.consecutive_overflows > MAX_CONSECUTIVE_OVERFLOWS:
            last = self.checkpointer.last
            raise NonFiniteLossError(
                f"{p.consecutive_overflows} consecutive float16 overflows at step {p.step + 1} (loss "
                f"{self.out['loss'].item():.4g}, loss scale {self.scaler.get_scale():.3g}): the loss is not finite. "
                f"Last good checkpoint: {last if last.exists() else 'none written yet'}. Resume it with "
                f"trainer.precision=bf16-mixed or 32-true and resume=auto, or lower optim.lr in a new run.dir.")
        self.optimizer.step()  # GradScaler.step skips the update (inf found), update() lowers the scale
        self.optimizer.zero_grad(set_to_none=True)
        self.log.line(f"float16 overflow at step {p.step + 1}: update skipped, loss scale lowered to "
                      f"{self.scaler.get_scale():g} ({p.overflow_steps} overflow(s) so far)")
        self.window.reset()
        return False

    def after_step(self, grad_norm: torch.Tensor) -> None:
        """The EMA update, the metrics window and the log line of a step just taken."""
        step = self.progress.step
        if self.ema is not None:
            # FSDP: the EMA averages the full parameters, gathered for the update (one all-gather per step)
            with full_parameters(self.module):
                self.ema.update(self.raw_module.get_submodule(self.task.ema_target), step=step)
        self.window.add_step(grad_norm)
        if step % self.cfg.trainer.log_every_steps == 0 or step == self.total_steps:
            logged = self.window.averages(self.cfg.data.batch_size * self.cfg.trainer.accumulate_grad_batches
                                          * self.fabric.world_size)
            logged["train/lr"] = self.optimizer.param_groups[0]["lr"]
            if self.scaler is not None:
                logged["train/loss_scale"] = self.scaler.get_scale()
                logged["train/overflow_steps"] = self.progress.overflow_steps
            logged["epoch"] = self.progress.epoch
            self.fabric.log_dict(logged, step=step)
            self.log.train(step, logged)
            self.window.reset()
        else:
            self.log.advance(step)

    def due(self, every: Optional[int]) -> bool:
        return bool(every) and self.progress.step % every == 0

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, final: bool = False) -> dict[str, float]:
        """The task's metrics (eval mode, no gradients, training RNG untouched), then ``last.ckpt``, the
        ``best.ckpt`` copy when the monitored metric improved, and the task's pictures."""
        fabric, p, started = self.fabric, self.progress, time.perf_counter()
        if self.budget is not None:  # evaluated at full size, like the model it is trained to become
            self.budget.restore(self.raw_module)
        with self.log.waiting(f"evaluating step {p.step}"):
            metrics = run_evaluation(self.task, self.module, self.context)
        metrics["epoch"] = p.epoch
        fabric.log_dict(metrics, step=p.step)
        improved = p.improves(metrics.get(self.monitor), self.mode)
        if improved:  # recorded in last.ckpt before the copy: a kill in between is repaired on resume
            p.best, p.best_step = metrics[self.monitor], p.step
        self.checkpointer.save_last()
        if improved:
            self.checkpointer.save_best()
        if fabric.is_global_zero:
            self.upload_checkpoint(improved)
        self.visualize()
        summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
        self.log.line(f"{'final' if final else 'eval'} step {p.step} epoch {p.epoch}: {summary}")
        self.window.start += time.perf_counter() - started  # train/images_per_sec times training, not evaluation
        return metrics

    def upload_checkpoint(self, best: bool) -> None:
        """``logger.log_checkpoints=true``: the checkpoint of this evaluation as a W&B artifact, aliased ``latest``
        (and ``best`` when it is the best so far)."""
        if not self.cfg.logger.log_checkpoints:
            return
        for logger in self.fabric.loggers:
            if hasattr(logger, "log_checkpoint"):
                logger.log_checkpoint(self.checkpointer.last, ["latest", f"step-{self.progress.step}"]
                                      + (["best"] if best else []), self.progress.step)

    def visualize(self) -> None:
        """The task's pictures, drawn like an evaluation (eval mode, no gradients, RNG untouched), by rank 0 with the
        unwrapped module: its forward runs no collective (DDP buffer syncs) on rank 0 alone. Under FSDP every
        forward gathers parameters from every process, so every process draws with the wrapped module, and the
        other ranks' files go to a temporary directory that is then deleted."""
        sharded = is_sharded(self.module)
        if not (sharded or self.fabric.is_global_zero):
            return
        module = self.module if sharded else self.raw_module
        with contextlib.ExitStack() as stack:
            out_dir = self.run_dir if self.fabric.is_global_zero else \
                Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pixelformer-pictures-")))
            with torch.random.fork_rng(devices=rng_devices(self.fabric)):
                with eval_mode(module), torch.no_grad():
                    try:
                        paths = self.task.visualize(module, self.context, out_dir, self.progress.step)
                    except Exception as e:  # noqa: BLE001 - a picture is never worth the run: it goes on
                        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                        self.fabric.print(f"warning: the {self.cfg.task.name} task's pictures at step "
                                          f"{self.progress.step} failed ({reason}); the run goes on without them")
                        paths = []
        if not self.fabric.is_global_zero:
            return
        for path in paths:
            for logger in self.fabric.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=path.stem, images=[str(path)], step=self.progress.step)

    # ------------------------------------------------------------------------------------------- the end
    def finish(self) -> dict[str, float]:
        """The final evaluation and checkpoint, ``eval.json``, and the loggers' success."""
        p = self.progress
        self.log.close()
        if p.batches_in_epoch >= self.batches_per_epoch:  # the last step ended an epoch
            p.epoch, p.batches_in_epoch = p.epoch + 1, 0
        metrics = self.evaluate(final=True)
        if self.fabric.is_global_zero:
            report = {"metrics": metrics, "step": p.step, "epoch": p.epoch,
                      "best": {self.monitor: p.best, "step": p.best_step}, "checkpoint": str(self.checkpointer.last),
                      "architecture": self.architecture,
                      **({"details": self.context.details} if self.context.details else {})}
            (self.run_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            for logger in self.fabric.loggers:
                logger.finalize("success")
        return metrics

    def interrupted(self, signum: int) -> TrainingInterrupted:
        """Save the step just taken (unless saved already), close the loggers, say how to resume."""
        self.checkpointer.save_last(unless_saved=True)
        self.log.close()
        if self.fabric.is_global_zero:
            for logger in self.fabric.loggers:
                logger.finalize("aborted")
        resume = f"python tools/train.py {shlex.quote(f'run.dir={self.run_dir}')} resume=auto"
        message = f"stopped by {signal.Signals(signum).name} at step {self.progress.step}; resume with: {resume}"
        if self.fabric.is_global_zero:
            print_stderr(message)  # saved above; a broken stderr must not turn the stop into a crash
        self.fabric.barrier()  # every process leaves together (Fabric's launcher kills the rest when one exits)
        return TrainingInterrupted(message, signum)


# ----------------------------------------------------------------------------------------------- helpers
#: 16-mixed: this many skipped steps in a row stop the run (GradScaler halves its scale at each: 2^16 -> 2^-8).
MAX_CONSECUTIVE_OVERFLOWS = 24


def loss_scaler(fabric: Fabric) -> Optional[torch.amp.GradScaler]:
    """The precision plugin's gradient scaler (16-mixed), or ``None``."""
    return getattr(fabric.strategy.precision, "scaler", None)


def clip_gradients(fabric: Fabric, module: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
    """Unscale (16-mixed), clip to ``max_norm`` and return the total gradient norm before clipping.

    Lightning refuses to clip for an optimizer that unscales inside its own step (fused AdamW) and cannot skip an
    overflowed step; so with a scaler the gradients are unscaled here (``GradScaler.unscale_`` records any inf for
    its ``step``, fused optimizers included) and clipped directly: by FSDP's own ``clip_grad_norm_`` (sharded
    gradients), else by torch's. Without a scaler, Fabric's clipping as before.
    """
    scaler = loss_scaler(fabric)
    if scaler is None:
        return fabric.clip_gradients(module, optimizer, max_norm=max_norm, error_if_nonfinite=False)
    scaler.unscale_(getattr(optimizer, "optimizer", optimizer))
    inner = getattr(module, "_forward_module", module)  # what the strategy wrapped (DDP, FSDP) or the module
    if hasattr(inner, "clip_grad_norm_"):  # FSDP: the norm over every shard
        return inner.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_([p for p in inner.parameters() if p.grad is not None], max_norm,
                                          error_if_nonfinite=False)


def rng_devices(fabric: Fabric) -> list:
    return [fabric.device] if fabric.device.type == "cuda" else []


def run_evaluation(task: Task, module: nn.Module, ctx: EvalContext) -> dict[str, float]:
    """``task.evaluate`` in eval mode without gradients. It must not move the training RNG streams, or a resumed
    run would diverge from an uninterrupted one, and is itself repeatable (e.g. MAE's masks on the test split).
    ``ctx.details`` is emptied first, so it holds this evaluation's details only."""
    ctx.details.clear()
    with torch.random.fork_rng(devices=rng_devices(ctx.fabric)):
        torch.manual_seed(ctx.cfg.run.seed)
        with eval_mode(module), torch.no_grad():
            return task.evaluate(module, ctx)


def eval_loaders(fabric: Fabric, cfg: DictConfig, train_set: Any, test_set: Any) -> dict[str, Any]:
    """The test split and the un-augmented training split, sharded over processes, batches moved to the device."""
    batch = eval_batch_size(cfg)
    device = fabric.device if cfg.data.on_device else None
    sets = {"test": test_set, "train": train_set.without_augmentation()}
    loaders = {name: leave_signals_to_main(build_loader(ds, batch, False, cfg.run.seed, fabric.global_rank,
                                                        fabric.world_size, cfg.data.num_workers, device))
               for name, ds in sets.items()}
    if not cfg.data.on_device:  # a DeviceTensorLoader's batches are on the device already
        loaders = dict(zip(loaders, fabric.setup_dataloaders(*loaders.values(), use_distributed_sampler=False)))
    if isinstance(fabric.strategy, FSDPStrategy) and fabric.world_size > 1:  # every forward is a collective
        loaders = {name: EqualBatches(loader, len(sets[name]), batch, fabric.global_rank, fabric.world_size, name)
                   for name, loader in loaders.items()}
    return loaders


def describe_module(module: nn.Module) -> dict[str, int]:
    """Depth, width, heads, tokens per image (prefix tokens included) and patches of the task module's backbone
    (``module.backbone``, read through the backbone contract), and the whole module's parameter count: what a run
    prints at start, logs to W&B and records in ``eval.json``. A task without a backbone (the vae task's
    autoencoder) gets the parameter count only."""
    from .models import describe_backbone

    params = sum(p.numel() for p in module.parameters())
    backbone = getattr(module, "backbone", None)
    if not callable(getattr(backbone, "token_layout", None)):
        return {"params": params}
    arch = describe_backbone(backbone)
    return {"depth": arch["depth"], "width": arch["embed_dim"], "heads": arch["num_heads"], "tokens": arch["tokens"],
            "patches": arch["num_patches"], "params": params}


def init_report(path: str, report: Mapping[str, list[str]]) -> str:
    def summarise(keys: list[str], shown: int = 6) -> str:
        if not keys:
            return "nothing"
        return ", ".join(keys[:shown]) + (f" ... ({len(keys)} in all)" if len(keys) > shown else "")

    return (f"init_from {path}: loaded {len(report['loaded'])} tensors"
            + "".join(f" from the {s}" for s in report.get("source", []))
            + f"; dropped {summarise(report['dropped'])}; re-initialised {summarise(report['reinitialised'])}"
            + "".join(f"; {k} equals the model's fixed table (kept)" for k in report.get("matched_fixed", [])))


def finished_run(run_dir: Path, resumed: Path, step: int, total_steps: int) -> Optional[dict[str, float]]:
    """The recorded final metrics when ``resumed`` is this run's final ``last.ckpt`` and ``eval.json`` reports it."""
    report_path, last = run_dir / "eval.json", run_dir / "checkpoints" / "last.ckpt"
    if report_path.exists() and not report_path.is_file():
        # Checked on every resume: the run would train to its end and then fail to write its report there.
        raise UserError(f"{report_path} is not a file (a directory?): the run writes its final report there; move "
                        f"it out of the way, then resume=auto")
    if step < total_steps or not report_path.exists() or not last.exists() or not resumed.samefile(last):
        return None
    try:
        report = json.loads(report_path.read_text(errors="replace"))
    except (ValueError, OSError):
        report = None
    if not isinstance(report, dict):  # not a run's report (a list, a string, broken JSON): evaluated again
        print(f"warning: {report_path} is not a run report (a JSON object with metrics and step): the final "
              f"evaluation runs again and rewrites it", file=sys.stderr)
        return None
    return report["metrics"] if report.get("step") == step and isinstance(report.get("metrics"), dict) else None
