"""Running a task: ``fit(cfg)`` sets up the run directory, loggers, Fabric and signal handling, then hands over to
:class:`pixelformer.trainer.Trainer`; ``evaluate_checkpoint`` scores a saved run again.

Losing nothing: checkpoints are atomic and hold everything a resumed run needs to continue exactly; SIGTERM and
SIGINT stop the run after the current step with a checkpoint; a run directory has one writer at a time
(``pixelformer.run``).
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from lightning.fabric.strategies import DDPStrategy, FSDPStrategy
from omegaconf import DictConfig

from .config import to_plain
from .console import write_stderr
from .distributed import fsdp_strategy
from .errors import UserError
from .tracking import build_loggers
from .run import CHECKPOINT_FORMAT, RunDirLock, check_resumable, peek_checkpoint, resolve_resume
from .runtime import auto_precision, tune_cpu_allocator
from .task import get_task
from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted, run_evaluation

__all__ = ["CHECKPOINT_FORMAT", "NonFiniteLossError", "TrainingInterrupted", "build_fabric", "evaluate_checkpoint",
           "fit", "resolve_precision", "resolve_run_dir"]

_RUN_DIR_ENV = "PIXELFORMER_RUN_DIR"  # shares the run directory with processes that Fabric launches
_named_here: set[str] = set()  # default run directories this process named (a process Fabric launches inherits one)


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
        if os.environ.get(_RUN_DIR_ENV) in _named_here:  # an earlier fit() in this process named it: a new run
            del os.environ[_RUN_DIR_ENV]
        launch = _external_launch() if _RUN_DIR_ENV not in os.environ else None
        if launch is not None:
            # The launcher starts every process at once: separate timestamps would split the run.
            raise UserError(f"this process is one of {launch[1]} started by {launch[0]}: set run.dir=<shared path> "
                            f"so that they all write one run")
        if _RUN_DIR_ENV not in os.environ:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            name = candidate = f"runs/{cfg.task.name}-{cfg.model.name}-{cfg.data.name}-{stamp}"
            for n in itertools.count(2):  # runs started within the same second
                if candidate not in _named_here and not Path(candidate).expanduser().exists():
                    break
                candidate = f"{name}-{n}"
            os.environ[_RUN_DIR_ENV] = candidate
            _named_here.add(candidate)
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


# ------------------------------------------------------------------------------------------------- fabric
def _model_width(cfg: DictConfig) -> int:
    """The configured backbone's token width (``describe_backbone`` builds it on the meta device: no memory)."""
    from .models import describe_backbone

    overrides = {k: v for k, v in cfg.model.items() if k != "name" and v is not None}
    try:
        return int(describe_backbone(cfg.model.name, **overrides)["embed_dim"])
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
        if trainer.strategy == "fsdp" and not cuda:  # FSDP on the CPU runs in full precision only (distributed.py)
            trainer.precision = "32-true"
    return trainer.precision


def build_fabric(cfg: DictConfig, loggers: Optional[list] = None) -> Fabric:
    trainer = cfg.trainer
    resolve_precision(cfg)
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if trainer.cpu_allocator == "tuned" and on_cpu:
        tune_cpu_allocator()  # before the first large tensor: see pixelformer/runtime.py
    timeout = timedelta(seconds=trainer.dist_timeout_s)  # a collective that waits longer raises (see fit)
    strategy: Any = trainer.strategy
    if strategy == "fsdp":
        # One FSDP unit per block; one consolidated file per checkpoint, like every other strategy; CPU too.
        strategy = fsdp_strategy(timeout, on_cpu, trainer.precision)
    elif strategy == "ddp":
        strategy = DDPStrategy(timeout=timeout)
    precision: Any = trainer.precision
    plugins = []
    if precision == "16-mixed" and on_cpu and not isinstance(strategy, FSDPStrategy):
        # Lightning would quietly run bf16 here; torch has float16 autocast and a GradScaler on the CPU: run those.
        plugins, precision = [MixedPrecision("16-mixed", device="cpu")], None
    try:
        return Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                      strategy=strategy, precision=precision, plugins=plugins or None, loggers=loggers)
    except (ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"cannot set up Fabric with trainer.accelerator={trainer.accelerator} devices="
                        f"{trainer.devices} strategy={trainer.strategy} precision={trainer.precision}: {e}") from None


class _StopOnSignal:
    """SIGTERM/SIGINT/SIGHUP handlers for the length of a run: the first signal asks the loop to stop after the
    current optimizer step (with a checkpoint); a second one gets the previous handler at once (abort).

    Python runs a handler only when the main thread returns to the interpreter; a process blocked inside one C call
    (a collective waiting for a process that died) would never see it. A watchdog thread reads the signal numbers
    that the C-level handler writes to a wakeup socket: when a signal stays unhandled for ``BLOCKED_GRACE_S``
    seconds, or a second one arrives meanwhile, it says so and ends the process (the last checkpoint is intact:
    checkpoints are written atomically).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: a closed terminal or dropped ssh session
    BLOCKED_GRACE_S = 60.0

    def __init__(self, fabric: Fabric, run_dir: Optional[Path] = None) -> None:
        self.fabric, self.run_dir = fabric, run_dir
        self.signum: Optional[int] = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}
        self._handled = 0
        self._wakeup: Optional[tuple[socket.socket, socket.socket, int]] = None

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a background job stays ignored
                    self._previous[signum] = signal.signal(signum, self._handle)
            if self._previous:
                reader, writer = socket.socketpair()
                writer.setblocking(False)
                reader.settimeout(1.0)  # here, not in the thread: the socket may be closed before the thread runs
                old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
                self._wakeup = (reader, writer, old)
                threading.Thread(target=self._watch, args=(reader,), name="pixelformer-signal-watchdog",
                                 daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
        if self._wakeup is not None:
            reader, writer, old = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(old)
            writer.close()
            reader.close()  # ends the watchdog

    def _watch(self, reader: socket.socket) -> None:
        """The watchdog thread (see the class docstring)."""
        watched = {int(s) for s in self.SIGNALS}
        arrived, first_unhandled, last = 0, None, 0
        while True:
            try:
                data = reader.recv(64)
                if not data:
                    return
            except socket.timeout:
                data = b""
            except OSError:  # closed by __exit__
                return
            for signum in data:
                if signum in watched:
                    arrived, last = arrived + 1, signum
            pending = arrived - self._handled
            if pending <= 0:
                first_unhandled = None
                continue
            first_unhandled = first_unhandled or time.monotonic()
            if pending >= 2 or time.monotonic() - first_unhandled > self.BLOCKED_GRACE_S:
                where = f"; the last checkpoint is {self.run_dir / 'checkpoints' / 'last.ckpt'}" if self.run_dir \
                    else ""
                write_stderr(f"\n{signal.Signals(last).name} received while this process was blocked (most "
                             f"likely in a collective waiting for another process that died or hangs): exiting "
                             f"without a new checkpoint{where}\n")
                os._exit(128 + last)

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process ends it when it stops
        self._handled += 1
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
        if self.fabric.is_global_zero:
            write_stderr(f"\n{signal.Signals(signum).name} received: stopping after this step with a checkpoint "
                         f"(send it again to stop at once)\n")

    def requested(self) -> Optional[int]:
        """The signal that stops the run at this step, agreed by every process (whichever got it), or ``None``."""
        signum = self.signum or 0
        if self.fabric.world_size > 1:
            signum = int(self.fabric.all_reduce(torch.tensor(signum, device=self.fabric.device),
                                                reduce_op="max").item())
        return signum or None


def check_same_config(fabric: Fabric, cfg: DictConfig) -> None:
    """Every process must run the same config: processes started with different ones (another data size, batch
    size or model) would wait for each other in a collective for ever. Each process sees every config and raises
    the same one-line error naming the keys that differ."""
    if fabric.world_size == 1:
        return
    from .distributed import every_rank
    from .run import flatten

    mine = flatten(to_plain(cfg))
    configs = every_rank(fabric, mine)
    differing = sorted({k for other in configs for k in other.keys() | mine.keys()
                        if any(c.get(k) != configs[0].get(k) for c in configs)})
    if differing:
        shown = ", ".join(f"{k} ({' / '.join(repr(c.get(k)) for c in configs)})" for k in differing[:6])
        raise UserError(f"the {fabric.world_size} processes were started with different configs: {shown} (by rank)"
                        f"{' ...' if len(differing) > 6 else ''}; start every process with the same arguments")


# ---------------------------------------------------------------------------------------------------- fit
def fit(cfg: DictConfig, show_config: bool = False) -> dict[str, float]:
    """Train ``cfg.task`` as configured; returns the final test metrics (also written to ``eval.json``).

    ``resume=auto`` continues ``run.dir`` from ``last.ckpt`` (a finished run returns its recorded metrics); the
    config may differ from the checkpoint's only in ``pixelformer.run.RESUMABLE_KEYS``. ``show_config`` prints
    the resolved config once the run is set up. SIGTERM or SIGINT stops the run after the current step with a
    checkpoint and raises :class:`TrainingInterrupted`.
    """
    if not isinstance(cfg, DictConfig):  # a plain dict has neither the schema's defaults nor its checks
        raise UserError(f"fit() takes the config that pixelformer.config.compose() returns (e.g. fit(compose("
                        f"['task=cls', 'trainer.max_steps=100']))), got {type(cfg).__name__}; a dict of settings "
                        f"becomes one with compose([f'{{k}}={{v}}' for k, v in settings.items()])")
    task = get_task(cfg.task.name)
    run_dir = resolve_run_dir(cfg)
    RunDirLock(run_dir).check()  # a run in progress is named before anything else is said about its files
    resume_path = resolve_resume(cfg, run_dir)
    saved = peek_checkpoint(resume_path) if resume_path is not None else None
    if saved is not None:
        check_resumable(resume_path, saved, cfg)
    resolve_precision(cfg)  # before the config is saved or logged: runs record what they ran with
    _make_run_dir(run_dir)
    loggers = build_loggers(cfg, run_dir, run_dir.name)
    fabric = build_fabric(cfg, loggers)
    fabric.launch()
    lock = RunDirLock(run_dir)
    refusal = fabric.broadcast(lock.acquire() if fabric.is_global_zero else None)
    if refusal:
        raise UserError(refusal)
    check_same_config(fabric, cfg)
    try:
        with _StopOnSignal(fabric, run_dir) as stop:
            return Trainer(fabric, cfg, task, run_dir, stop).fit(resume_path, saved, show_config)
    except RuntimeError as e:  # gloo and NCCL report a collective that waited past the timeout as a RuntimeError
        message = str(e).lower()
        if fabric.world_size == 1 or not ("timed out" in message or "timeout" in message):
            raise
        last = run_dir / "checkpoints" / "last.ckpt"
        raise UserError(f"process {fabric.global_rank} waited more than trainer.dist_timeout_s="
                        f"{cfg.trainer.dist_timeout_s} s for the others in a collective operation (another process "
                        f"died or hangs: see its output); last checkpoint: "
                        f"{last if last.exists() else 'none written yet'}; fix the cause and resume with "
                        f"resume=auto") from None
    finally:
        lock.release()
        for logger in loggers:
            if hasattr(logger, "close"):
                logger.close()


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_checkpoint(path: str | os.PathLike, overrides: list[str],
                        details: Optional[dict[str, Any]] = None) -> tuple[dict[str, float], DictConfig, Any]:
    """Evaluate a saved run on its test split; ``overrides`` change the saved config (e.g. ``data.img_size=16``,
    where a learned position embedding is resized to the new grid). ``details``, when given, receives what the
    evaluation found besides its scalar metrics (``EvalContext.details``: e.g. a classifier's confusion matrix)."""
    import copy

    from .checkpoint import read_checkpoint
    from .data import build_datasets
    from .saved import checkpoint_of, load_run
    from .task import EvalContext
    from .trainer import eval_loaders

    ckpt = read_checkpoint(checkpoint_of(path))
    named = {o.split("=", 1)[0] for o in overrides}
    if not named & {"trainer", "trainer.devices", "trainer.num_nodes", "trainer.strategy"}:
        # One process, whatever the run trained on (a DDP or FSDP checkpoint is consolidated): trainer.devices=N
        # evaluates on N processes, each a shard of the test split.
        overrides = ["trainer.devices=1", "trainer.num_nodes=1", "trainer.strategy=auto", *overrides]
    cfg, _, task, module = load_run(path, overrides=overrides, ckpt=ckpt)
    ema = None
    if task.ema_target is not None and isinstance(ckpt.get("ema"), dict):  # what evaluation samples with
        ema = copy.deepcopy(module.get_submodule(task.ema_target))
        ema.load_state_dict(ckpt["ema"])
    del ckpt
    fabric = build_fabric(cfg)
    fabric.launch()
    train_set, test_set, info = build_datasets(cfg.data)
    ctx = EvalContext(fabric, cfg, info, eval_loaders(fabric, cfg, train_set, test_set),
                      fabric.to_device(ema) if ema is not None else None)
    metrics = run_evaluation(task, fabric.setup_module(module), ctx)
    if details is not None:
        details.update(ctx.details)
    return metrics, cfg, info
