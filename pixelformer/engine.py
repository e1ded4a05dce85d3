"""The training engine shared by every task: Fabric set-up, the loop, evaluation, checkpoints and resume.

The loop in :func:`fit` is plain PyTorch written against Fabric: ``module(batch)`` returns a loss dict,
``fabric.backward``, gradient clipping, ``optimizer.step``, a step-based LR schedule. A task plugs in through
:class:`pixelformer.task.Task`; nothing here knows which task runs.

Losing nothing: checkpoints are atomic and hold everything a resumed run needs to continue exactly (including the
logging window and which step is the best); SIGTERM and SIGINT stop the run after the current step with a
checkpoint; a run directory has one writer at a time (``pixelformer.rundir``).
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import (TRANSPOSED_SINCOS_FORMAT, capture_rng_state, check_state_dict, fsync_and_replace,
                         read_checkpoint, restore_rng_state)
from .config import check_accumulation, compose_saved, eval_batch_size, to_plain
from .data import build_datasets, build_loader
from .errors import CheckpointError, UserError
from .loggers import build_loggers
from .optim import build_optimizer, build_scheduler
from .rundir import RunDirLock, check_resume_config, peek_checkpoint, resolve_resume
from .runtime import auto_precision, check_fits_memory, tune_cpu_allocator
from .task import Task, eval_mode, get_task

__all__ = ["CHECKPOINT_FORMAT", "NonFiniteLossError", "TrainingInterrupted", "build_fabric", "evaluate_checkpoint",
           "fit", "resolve_precision", "resolve_run_dir"]

CHECKPOINT_FORMAT = "pixelformer-checkpoint/2"  # 1: before the sin-cos layout fix (still resumable, with a warning)
_RUN_DIR_ENV = "PIXELFORMER_RUN_DIR"  # shares the run directory with processes that Fabric launches


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


# -------------------------------------------------------------------------------------------- run directory
def _external_launch() -> Optional[tuple[str, int]]:
    """``(launcher, world size)`` when a cluster launcher started this process as one of several, else ``None``.

    Lightning's own detection (the environments Fabric itself picks from), plus a plain ``WORLD_SIZE``.
    """
    from lightning.fabric.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                       TorchElasticEnvironment)

    for name, env in (("SLURM", SLURMEnvironment), ("torchrun / fabric run", TorchElasticEnvironment),
                      ("LSF", LSFEnvironment), ("MPI", MPIEnvironment)):
        try:
            size = env().world_size() if env.detect() else 1
        except Exception:  # an environment half set up: Fabric reports it when it starts
            continue
        if size > 1:
            return name, size
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return ("an external launcher", size) if size > 1 else None


def resolve_run_dir(cfg: DictConfig) -> Path:
    """Fill ``cfg.run.dir`` (default ``runs/<task>-<model>-<data>-<timestamp>``) identically on every process."""
    if cfg.run.dir is None:
        launch = _external_launch() if _RUN_DIR_ENV not in os.environ else None
        if launch is not None:
            # The launcher starts every process at once: separate timestamps would split the run.
            raise UserError(f"this process is one of {launch[1]} started by {launch[0]}: set run.dir=<shared path> "
                            f"so that they all write one run")
        if _RUN_DIR_ENV not in os.environ:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            os.environ[_RUN_DIR_ENV] = f"runs/{cfg.task.name}-{cfg.model.name}-{cfg.data.name}-{stamp}"
        cfg.run.dir = os.environ[_RUN_DIR_ENV]
    return Path(cfg.run.dir).expanduser()


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


def _prepare_run_dir(run_dir: Path, cfg: DictConfig, resume_step: Optional[int], final_again: bool = False) -> None:
    """Write ``config.yaml``; on resume, cut ``metrics.jsonl`` back to what the checkpoint had logged.

    ``final_again``: the checkpoint is the final one but the run did not finish (no ``eval.json``), so its final
    evaluation runs again and its earlier record is dropped.
    """
    try:
        _write_run_files(run_dir, cfg, resume_step, final_again)
    except OSError as e:  # at start nothing is lost yet: stop with the file's name rather than train unrecorded
        raise UserError(f"cannot write {e.filename or run_dir} ({e.strerror}): make it a writable file, or choose "
                        f"another run.dir") from None


def _write_run_files(run_dir: Path, cfg: DictConfig, resume_step: Optional[int], final_again: bool) -> None:
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        # Fresh start: begin a new file. Resume: drop what was logged after the checkpoint, it is logged again.
        keep = []
        if resume_step is not None:
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                    step = record.get("step", 0)
                    if step < resume_step or (step == resume_step and not (final_again and "train/loss" not in record)):
                        keep.append(line + "\n")
                except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
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


_WORKER_EXIT_HOOK = False


def _ignore_stop_signals(inner: Optional[Any], worker_id: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if inner is not None:
        inner(worker_id)


def _kill_workers_at_exit() -> None:
    # multiprocessing's own exit hook ends daemonic children with SIGTERM and then waits for them: a worker that
    # ignores SIGTERM (below) and was not shut down by its loader (e.g. the run died of a worker's error) would make
    # the interpreter wait for ever. Registered after that hook, this one runs first.
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report these kills as worker failures
        for worker in workers:
            worker.kill()
            worker.join()


def _leave_signals_to_main(loader: Any) -> Any:
    """Make ``loader``'s worker processes ignore SIGTERM/SIGINT: the main process stops them once it has saved.

    SLURM signals every process of a job and a terminal every process of its group; a worker ended by the signal
    would make the main process fail (torch's SIGCHLD handler) before it saves.
    """
    global _WORKER_EXIT_HOOK
    if getattr(loader, "num_workers", 0) > 0:
        loader.worker_init_fn = functools.partial(_ignore_stop_signals, loader.worker_init_fn)
        if not _WORKER_EXIT_HOOK:
            atexit.register(_kill_workers_at_exit)
            _WORKER_EXIT_HOOK = True
    return loader


def _eval_loaders(fabric: Fabric, cfg: DictConfig, train_set, test_set) -> dict[str, Any]:
    """The test split and the un-augmented training split, sharded over processes, batches moved to the device."""
    batch = eval_batch_size(cfg)
    device = fabric.device if cfg.data.on_device else None
    loaders = {name: _leave_signals_to_main(build_loader(ds, batch, False, cfg.run.seed, fabric.global_rank,
                                                         fabric.world_size, cfg.data.num_workers, device))
               for name, ds in (("test", test_set), ("train", train_set.without_augmentation()))}
    if cfg.data.on_device:
        return loaders  # their batches are on the device already
    return dict(zip(loaders, fabric.setup_dataloaders(*loaders.values(), use_distributed_sampler=False)))


def _evaluate(fabric: Fabric, task: Task, module: nn.Module, loaders: dict[str, Any],
              cfg: DictConfig) -> dict[str, float]:
    # Evaluation must not move the training RNG streams, or a resumed run would diverge from an uninterrupted one.
    with torch.random.fork_rng(devices=_rng_devices(fabric)):
        torch.manual_seed(cfg.run.seed)  # and is itself repeatable (e.g. MAE's masks on the test split)
        with eval_mode(module), torch.no_grad():
            metrics = task.evaluate(fabric, module, loaders, cfg)
    return metrics


def _visualize(fabric: Fabric, task: Task, module: nn.Module, loaders: dict[str, Any], cfg: DictConfig,
               run_dir: Path, step: int) -> None:
    """Rank 0 only: the task's pictures, drawn like an evaluation (eval mode, no gradients, RNG untouched)."""
    with torch.random.fork_rng(devices=_rng_devices(fabric)):
        with eval_mode(module), torch.no_grad():
            # The unwrapped module, whose forward runs no collective (DDP buffer syncs) on rank 0 alone.
            paths = task.visualize(fabric, module.module, loaders, cfg, run_dir, step)
    for path in paths:
        for logger in fabric.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=path.stem, images=[str(path)], step=step)


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


def _restore_best(resumed: Path, ckpt_dir: Path, progress: Mapping[str, Any]) -> None:
    """Redo the copy to ``best.ckpt`` that a kill between writing ``last.ckpt`` and copying it cut off.

    ``progress["best_step"]`` records the step of the best evaluation; when it is the resumed checkpoint's own
    step, ``best.ckpt`` must hold that step too.
    """
    best = ckpt_dir / "best.ckpt"
    if progress.get("best_step") != progress["step"] or (best.exists() and best.samefile(resumed)):
        return
    try:
        held = (peek_checkpoint(best).get("progress") or {}).get("step") if best.exists() else None
    except CheckpointError:
        held = None  # unreadable: replaced
    if held != progress["step"]:
        _copy_atomic(resumed, best)


def _load_for_resume(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    ckpt = read_checkpoint(path)
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


def _check_resumable(path: Path, saved: Mapping[str, Any], cfg: DictConfig) -> None:
    """A training checkpoint whose config differs from ``cfg`` only where a resume may change it."""
    known = (CHECKPOINT_FORMAT, TRANSPOSED_SINCOS_FORMAT)
    if saved.get("format") not in known or not isinstance(saved.get("config"), dict):
        raise UserError(f"{path} is not a pixelformer training checkpoint (format {saved.get('format')!r}), so a run "
                        f"cannot be resumed from it")
    if cfg.trainer.precision == "auto":  # the run keeps the precision it resolved when it started
        cfg.trainer.precision = saved["config"].get("trainer", {}).get("precision", "auto")
    check_resume_config(saved["config"], cfg, path)


def _planned_steps(trainer: Mapping[str, Any], steps_per_epoch: int) -> int:
    return trainer["max_steps"] or trainer["max_epochs"] * steps_per_epoch


def _finished_run(run_dir: Path, resumed: Path, step: int, total_steps: int) -> Optional[dict[str, float]]:
    """The recorded final metrics when ``resumed`` is this run's final ``last.ckpt`` and ``eval.json`` reports it."""
    report_path, last = run_dir / "eval.json", run_dir / "checkpoints" / "last.ckpt"
    if step < total_steps or not report_path.exists() or not last.exists() or not resumed.samefile(last):
        return None
    try:
        report = json.loads(report_path.read_text())
    except ValueError:
        return None
    return report["metrics"] if report.get("step") == step and isinstance(report.get("metrics"), dict) else None


class _Window:
    """Sums of the logged training values since the last log line. They are checkpointed, so a resumed run logs
    the same averages as an uninterrupted one; only throughput is timed afresh."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
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

    def averages(self, images_per_step: int) -> dict[str, float]:
        logged = {f"train/{k}": (v / (self.steps if k == "grad_norm" else self.micro)).item()
                  for k, v in self.sums.items()}
        elapsed = time.perf_counter() - self.start
        logged["train/images_per_sec"] = self.timed_steps * images_per_step / max(elapsed, 1e-9)
        return logged

    def state(self) -> dict[str, Any]:
        # float32 sums round-trip exactly through Python floats
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "micro": self.micro, "steps": self.steps}

    def load(self, state: Optional[Mapping[str, Any]]) -> None:
        if state:  # checkpoints written before the window was saved have none
            self.sums = {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in state["sums"].items()}
            self.micro, self.steps = state["micro"], state["steps"]


class _StopOnSignal:
    """SIGTERM/SIGINT handlers for the length of a run: the first signal asks the loop to stop after the current
    optimizer step (with a checkpoint); a second one gets the previous handler at once (abort)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.signum: Optional[int] = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job stays ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process ends it when it stops
        if self.signum is not None:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self.__exit__()
            if callable(previous):
                previous(signum, frame)
            elif signum == signal.SIGINT:
                raise KeyboardInterrupt
            else:
                signal.raise_signal(signum)  # the default action: end the process
            return
        self.signum = signum
        if self.fabric.is_global_zero:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                        f"(send it again to stop at once)\n".encode())

    def requested(self) -> Optional[int]:
        """The signal that stops the run at this step, agreed by every process (whichever got it), or ``None``."""
        signum = self.signum or 0
        if self.fabric.world_size > 1:
            signum = int(self.fabric.all_reduce(torch.tensor(signum, device=self.fabric.device),
                                                reduce_op="max").item())
        return signum or None


# ---------------------------------------------------------------------------------------------------- fit
def fit(cfg: DictConfig, show_config: bool = False) -> dict[str, float]:
    """Train ``cfg.task`` as configured; returns the final test metrics (also written to ``eval.json``).

    ``resume=auto`` continues ``run.dir`` from ``last.ckpt`` (a finished run returns its recorded metrics); the
    config may differ from the checkpoint's only in ``pixelformer.rundir.RESUMABLE_KEYS``. ``show_config`` prints
    the resolved config once the run is set up. SIGTERM or SIGINT stops the run after the current step with a
    checkpoint and raises :class:`TrainingInterrupted`.
    """
    task = get_task(cfg.task.name)
    run_dir = resolve_run_dir(cfg)
    RunDirLock(run_dir).check()  # a run in progress is named before anything else is said about its files
    resume_path = resolve_resume(cfg, run_dir)
    saved = peek_checkpoint(resume_path) if resume_path is not None else None
    if saved is not None:
        _check_resumable(resume_path, saved, cfg)
    resolve_precision(cfg)  # before the config is saved or logged: runs record what they ran with
    _make_run_dir(run_dir)
    loggers = build_loggers(cfg, run_dir, run_dir.name)
    fabric = build_fabric(cfg, loggers)
    fabric.launch()
    lock = RunDirLock(run_dir)
    refusal = fabric.broadcast(lock.acquire() if fabric.is_global_zero else None)
    if refusal:
        raise UserError(refusal)
    try:
        with _StopOnSignal(fabric) as stop:
            return _train(fabric, cfg, task, run_dir, resume_path, saved, stop, show_config)
    finally:
        lock.release()


def _train(fabric: Fabric, cfg: DictConfig, task: Task, run_dir: Path, resume_path: Optional[Path],
           saved: Optional[Mapping[str, Any]], stop: _StopOnSignal, show_config: bool) -> dict[str, float]:
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    fabric.seed_everything(cfg.run.seed, verbose=False)

    train_set, test_set, info = build_datasets(cfg.data)
    check_fits_memory(cfg, info, fabric.device)
    with fabric.init_module():
        module = task.build_module(cfg, info)
    if cfg.init_from and resume_path is None:
        report = task.init_from(module, cfg.init_from)
        fabric.print(f"init_from {cfg.init_from}: loaded {len(report['loaded'])} tensors"
                     + "".join(f" from the {s}" for s in report.get("source", []))
                     + f"; dropped {_summarise(report['dropped'])}"
                     + f"; re-initialised {_summarise(report['reinitialised'])}"
                     + "".join(f"; {k} equals the model's fixed table (kept)" for k in report.get("matched_fixed", [])))
    if cfg.trainer.grad_checkpointing:
        for sub in module.modules():
            if hasattr(sub, "set_grad_checkpointing"):
                sub.set_grad_checkpointing(True)
    optimizer = build_optimizer(module, cfg.optim, fabric.device)

    batch_size, accum = cfg.data.batch_size, cfg.trainer.accumulate_grad_batches
    train_loader = _leave_signals_to_main(build_loader(train_set, batch_size, True, cfg.run.seed, fabric.global_rank,
                                                       fabric.world_size, cfg.data.num_workers,
                                                       fabric.device if cfg.data.on_device else None))
    if len(train_loader) == 0:
        raise UserError(f"the training split has {len(train_set)} images, fewer than one batch per process")
    sampler = train_loader.sampler
    batches_per_epoch = len(train_loader)
    check_accumulation(cfg, batches_per_epoch, len(train_set))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = _planned_steps(cfg.trainer, steps_per_epoch)
    if saved is not None:
        planned = _planned_steps(saved["config"]["trainer"], steps_per_epoch)
        if total_steps < planned:
            raise UserError(f"trainer.max_steps={cfg.trainer.max_steps} max_epochs={cfg.trainer.max_epochs} give "
                            f"{total_steps} steps, fewer than the {planned} that {resume_path} was training for: a "
                            f"resumed run may be made longer, not shorter; revert them, or start a new run.dir")
        finished = _finished_run(run_dir, resume_path, saved["progress"]["step"], total_steps)
        if finished is not None:
            fabric.print(f"run {run_dir} has finished (step {saved['progress']['step']}, eval.json): its recorded "
                         f"metrics are returned; raise trainer.max_steps or trainer.max_epochs to train it further")
            return finished
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

    ckpt_dir = run_dir / "checkpoints"
    progress = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "best": None, "best_step": None}
    window = _Window(fabric.device)
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT, "model": module, "optimizer": optimizer, "scheduler": scheduler,
        **task.extra_state(fabric, module), "progress": progress, "config": to_plain(cfg),
        "data_info": dataclasses.asdict(info),
    }
    if resume_path is not None:
        _load_for_resume(fabric, resume_path, state)
        progress = state["progress"]
        progress.setdefault("best_step", None)
        window.load(progress.get("window"))
        if fabric.is_global_zero:
            _restore_best(resume_path, ckpt_dir, progress)
        fabric.print(f"resumed from {resume_path} at step {progress['step']} (epoch {progress['epoch']})")
    state["config"] = to_plain(cfg)  # the running config, not the one loaded from the checkpoint
    if fabric.is_global_zero:
        _prepare_run_dir(run_dir, cfg, progress["step"] if resume_path else None,
                         final_again=progress["step"] >= total_steps)
        for logger in fabric.loggers:
            logger.log_hyperparams(state["config"])
    fabric.barrier()

    monitor, mode = task.monitor
    if show_config and fabric.is_global_zero:
        print(OmegaConf.to_yaml(cfg), end="---\n")
    fabric.print(f"task={cfg.task.name} model={cfg.model.name} ({num_params / 1e6:.2f} M params{tokens}) "
                 f"data={cfg.data.name} "
                 f"({len(train_set)} train / {len(test_set)} test, {info.img_size}x{info.img_size}x{info.in_chans}) "
                 f"steps={total_steps} precision={cfg.trainer.precision} devices={fabric.world_size}\n"
                 f"run dir: {run_dir}")
    saved_step = progress["step"] if resume_path is not None else None

    def save_last() -> None:
        nonlocal saved_step
        progress["window"] = window.state()
        _save(fabric, ckpt_dir / "last.ckpt", state)
        saved_step = progress["step"]

    def evaluate_and_checkpoint(final: bool = False) -> dict[str, float]:
        metrics = _evaluate(fabric, task, module, eval_loaders, cfg)
        step = progress["step"]
        metrics["epoch"] = progress["epoch"]
        fabric.log_dict(metrics, step=step)
        value = metrics.get(monitor)
        improved = value is not None and (progress["best"] is None or
                                          (value > progress["best"] if mode == "max" else value < progress["best"]))
        if improved:
            # Recorded in last.ckpt before the copy: a kill in between is repaired on resume (_restore_best).
            progress["best"], progress["best_step"] = value, step
        save_last()
        if improved and fabric.is_global_zero:
            _copy_atomic(ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt")
        if fabric.is_global_zero:
            _visualize(fabric, task, module, eval_loaders, cfg, run_dir, step)
        summary = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "epoch")
        fabric.print(f"{'final' if final else 'eval'} step {step} epoch {progress['epoch']}: {summary}")
        return metrics

    def stop_here(signum: int) -> TrainingInterrupted:
        if saved_step != progress["step"]:
            save_last()
        bar.close()
        if fabric.is_global_zero:
            for logger in fabric.loggers:
                logger.finalize("aborted")
        resume = f"python tools/train.py {shlex.quote(f'run.dir={run_dir}')} resume=auto"
        message = f"stopped by {signal.Signals(signum).name} at step {progress['step']}; resume with: {resume}"
        fabric.print(message, file=sys.stderr)
        fabric.barrier()  # every process leaves together (Fabric's launcher kills the rest when one exits)
        return TrainingInterrupted(message, signum)

    eval_every_steps, eval_every_epochs = cfg.trainer.eval_every_steps, cfg.trainer.eval_every_epochs
    log_every, ckpt_every = cfg.trainer.log_every_steps, cfg.trainer.ckpt_every_steps
    max_norm = cfg.trainer.grad_clip if cfg.trainer.grad_clip is not None else float("inf")
    images_per_step = batch_size * accum * fabric.world_size
    bar = tqdm(total=total_steps, initial=progress["step"], desc="train", dynamic_ncols=True,
               disable=not (fabric.is_global_zero and cfg.trainer.progress_bar))
    window.start = time.perf_counter()  # throughput counts training, not the set-up
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
            window.add_micro_batch(out)
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
                    window.reset()
                    micro = 0
                    continue
                last = ckpt_dir / "last.ckpt"
                raise NonFiniteLossError(
                    f"non-finite loss or gradients at step {progress['step'] + 1} (loss {out['loss'].item():.4g}); "
                    f"the run stopped before applying that update. Last good checkpoint: "
                    f"{last if last.exists() else 'none written yet'}. Set trainer.grad_clip, "
                    f"trainer.precision=32-true or trainer.skip_nonfinite_steps=N and resume=auto, or train with a "
                    f"lower optim.lr in a new run.dir."
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress["step"] += 1
            progress["batches_in_epoch"] = index + 1
            task.on_train_step_end(module, progress["step"])
            step, micro = progress["step"], 0
            window.add_step(grad_norm)
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                logged = window.averages(images_per_step)
                logged["train/lr"] = optimizer.param_groups[0]["lr"]
                logged["epoch"] = progress["epoch"]
                fabric.log_dict(logged, step=step)
                bar.set_postfix(loss=f"{logged['train/loss']:.4f}", lr=f"{logged['train/lr']:.2e}")
                window.reset()
            if step >= total_steps:
                break
            if eval_every_steps and step % eval_every_steps == 0:
                evaluate_and_checkpoint()
            elif ckpt_every and step % ckpt_every == 0:
                save_last()
            signum = stop.requested()
            if signum is not None:
                raise stop_here(signum)
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
                  "best": {monitor: progress["best"], "step": progress["best_step"]},
                  "checkpoint": str(ckpt_dir / "last.ckpt")}
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
