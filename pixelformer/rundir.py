"""The run directory's safety rules: what a run may resume from, what a resume may change, one writer at a time.

* :func:`resolve_resume` picks the checkpoint a run continues from, and refuses to start over a directory that
  holds a run's results but no ``last.ckpt`` (it would overwrite ``best.ckpt`` and the metrics).
* :data:`RESUMABLE_KEYS` and :func:`check_resume_config`: a resumed run keeps its recipe; only the keys listed may
  differ from the checkpoint's config.
* :func:`compose_for_resume`: ``tools/train.py run.dir=X resume=auto`` starts from the saved config, so a resume
  command does not have to repeat the original arguments.
* :class:`Checkpointer`: writes ``last.ckpt`` atomically, copies it to ``best.ckpt``, resumes from a checkpoint.
* :func:`prepare_run_files`: ``config.yaml``, and ``metrics.jsonl`` cut back to what a resumed checkpoint had logged.
* :class:`RunDirLock`: an advisory ``flock`` on ``<run.dir>/.lock`` held by the writing process.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import (TRANSPOSED_SINCOS_FORMAT, capture_rng_state, check_state_dict, fsync_and_replace,
                         read_checkpoint, restore_rng_state)
from .config import GROUPS, compose, compose_saved, to_plain, validate
from .errors import CheckpointError, UserError

if TYPE_CHECKING:
    from lightning.fabric import Fabric

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_FORMAT", "RESUMABLE_KEYS", "Checkpointer", "RunDirLock", "check_resumable",
           "check_resume_config", "compose_for_resume", "peek_checkpoint", "prepare_run_files", "resolve_resume",
           "resume_source"]

CHECKPOINT_FORMAT = "pixelformer-checkpoint/2"  # 1: before the sin-cos layout fix (still resumable, with a warning)

# Config keys that a resume may change (a trailing dot: a whole section); check_resume_config says why.
RESUMABLE_KEYS: tuple[str, ...] = (
    "resume", "init_from", "run.dir", "logger.",
    "trainer.progress_bar", "trainer.log_every_steps", "trainer.eval_every_steps", "trainer.eval_every_epochs",
    "trainer.ckpt_every_steps", "trainer.max_steps", "trainer.max_epochs", "trainer.grad_clip",
    "trainer.skip_nonfinite_steps", "trainer.accelerator", "trainer.strategy", "trainer.precision",
    "trainer.compile", "trainer.grad_checkpointing", "trainer.deterministic", "trainer.cpu_allocator",
    "trainer.memory_check",
    "optim.fused", "data.root", "data.download", "data.num_workers", "data.on_device", "data.eval_batch_size",
)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ------------------------------------------------------------------------------------------ checkpoints
def peek_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's ``config`` and ``progress`` entries, read through a memory map (no full load)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ckpt = read_checkpoint(path)  # raises the CheckpointError that names the problem, or reads it fully
    return {key: ckpt.get(key) for key in ("format", "config", "progress")} if isinstance(ckpt, dict) else {}


def resume_source(cfg: DictConfig) -> Optional[Path]:
    """The checkpoint that ``cfg.resume`` points at, if it exists (``auto``: ``<run.dir>/checkpoints/last.ckpt``)."""
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        if cfg.run.dir is None:
            return None
        path = Path(cfg.run.dir).expanduser() / "checkpoints" / "last.ckpt"
    else:
        path = Path(cfg.resume).expanduser()
    return path if path.is_file() else None


def _recorded(run_dir: Path) -> tuple[bool, bool]:
    """Whether ``run_dir`` holds any metrics, and whether it holds evaluation results (which every run follows
    with a checkpoint, so they mean that a checkpoint was lost)."""
    evaluated = (run_dir / "eval.json").exists()
    logged = False
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(record, dict):
                logged = True
                evaluated = evaluated or "train/loss" not in record
    return logged or evaluated, evaluated


def resolve_resume(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from (``None``: start at step 0), or a :class:`UserError` when starting would
    overwrite what a run left in ``run_dir``."""
    last = run_dir / "checkpoints" / "last.ckpt"
    best = run_dir / "checkpoints" / "best.ckpt"
    if cfg.resume not in (None, "auto"):
        path = Path(cfg.resume).expanduser()
        if not path.is_file():
            raise UserError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto with run.dir=<run> to "
                            f"pick up <run>/checkpoints/last.ckpt)")
        return path
    if last.exists():
        if cfg.resume is None:
            raise UserError(f"run directory {run_dir} already holds a run ({last}): pass resume=auto to continue "
                            f"it, or choose a new run.dir")
        return last
    if best.exists():
        raise UserError(f"run directory {run_dir} holds {best} but no last.ckpt: pass resume={best} to continue "
                        f"from the best checkpoint, or choose a new run.dir (starting over would overwrite it)")
    logged, evaluated = _recorded(run_dir)
    if evaluated:
        raise UserError(f"run directory {run_dir} holds a run's results (metrics.jsonl, eval.json) but no "
                        f"checkpoint to continue it from: choose a new run.dir, or delete {run_dir} to start over")
    if logged and cfg.resume is None:
        raise UserError(f"run directory {run_dir} holds a run that stopped before its first checkpoint "
                        f"(metrics.jsonl): pass resume=auto to start it again from step 0, or choose a new run.dir")
    return None  # resume=auto with nothing saved yet: start at step 0 (the same steps are logged again)


# ------------------------------------------------------------------------------------------------ config
def check_resume_config(saved: Mapping[str, Any], cfg: DictConfig, source: Path) -> None:
    """Refuse a resume whose config differs from the checkpoint's ``saved`` one outside :data:`RESUMABLE_KEYS`.

    A resumed run keeps its recipe. The keys that may change say where and how the run is carried out, not what it
    computes, or act only from the next step on:

    * ``resume``, ``init_from`` (ignored on resume), ``run.dir``, ``logger.*``;
    * ``trainer.progress_bar``, ``trainer.log_every_steps``, ``trainer.eval_every_steps``,
      ``trainer.eval_every_epochs``, ``trainer.ckpt_every_steps``;
    * ``trainer.max_steps`` and ``trainer.max_epochs``, as long as the run gets longer (``engine.fit`` checks that;
      the learning-rate schedule is stretched to the new length from the resumed step on);
    * ``trainer.grad_clip`` and ``trainer.skip_nonfinite_steps`` (e.g. to get past a NaN stop);
    * ``trainer.accelerator``, ``trainer.strategy``, ``trainer.precision``, ``trainer.compile``,
      ``trainer.grad_checkpointing``, ``trainer.deterministic``, ``trainer.cpu_allocator``, ``trainer.memory_check``,
      ``optim.fused``: the same computation, up to rounding;
    * ``data.root``, ``data.download``, ``data.num_workers``, ``data.on_device`` (identical batches),
      ``data.eval_batch_size``.

    Everything else is refused, each changed key named with its old and new value: ``task.*``, ``model.*``,
    ``optim.*`` (the scheduler restores its saved base learning rates, so a new ``optim.lr`` would not be used),
    ``run.seed``, and the keys that fix the batches and where an interrupted epoch resumes (``data.name``,
    ``data.batch_size``, ``data.limit_*``, ``data.augment``, ``trainer.devices``, ``trainer.num_nodes``,
    ``trainer.accumulate_grad_batches``, ...).
    """
    old, new = _flatten(saved), _flatten(to_plain(cfg))
    changed = [k for k in sorted(old.keys() & new.keys()) if old[k] != new[k] and not _resumable(k)]
    if changed:
        listed = ", ".join(f"{k} ({old[k]} -> {new[k]})" for k in changed)
        raise UserError(f"cannot resume {source} with a changed {listed}: a resumed run keeps its recipe; revert "
                        f"{'these keys' if len(changed) > 1 else 'the key'}, or start a new run.dir")


def _explicit_keys(args: list[str], cfg: DictConfig) -> list[str]:
    """The config keys that command-line ``args`` set: ``a.b=v`` sets ``a.b``, ``group=choice`` its whole section."""
    keys = []
    for arg in args:
        key = arg.split("=", 1)[0]
        if key in GROUPS:
            keys += [f"{key}.{k}" for k in _flatten(to_plain(cfg[key]))]
        else:
            keys.append(key)
    return keys


def compose_for_resume(args: list[str]) -> DictConfig:
    """``compose(args)``, except that a run being resumed starts from its saved config and ``args`` change keys.

    ``python tools/train.py run.dir=runs/a resume=auto`` thus continues ``runs/a`` as it was configured; repeating
    the original arguments gives the same config; a changed key is checked by ``engine.fit`` like any other.
    """
    cfg = compose(args)
    source = resume_source(cfg)
    if source is None:
        return cfg
    saved = peek_checkpoint(source).get("config")
    if not isinstance(saved, dict) or not isinstance(saved.get("task"), dict):
        return cfg  # not a pixelformer run: fit reports it
    if "task" in (a.split("=", 1)[0] for a in args) and saved["task"].get("name") != cfg.task.name:
        return cfg  # another task named on purpose: fit reports the difference
    resumed = compose_saved(saved, [])
    for key in _explicit_keys(args, cfg):
        value = OmegaConf.select(cfg, key)
        OmegaConf.update(resumed, key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value,
                         merge=False)
    validate(resumed)
    return resumed


# ------------------------------------------------------------------------------------- writing and resuming
class Checkpointer:
    """Saves and restores a run's ``state`` (a plain dict of objects with ``state_dict()`` and plain values).

    ``last.ckpt`` is written to a temporary file and renamed by rank 0, so a kill leaves the old file or the new
    one; ``best.ckpt`` is an atomic copy of it. Each file carries the format tag and the RNG states.
    """

    def __init__(self, fabric: Fabric, run_dir: Path, state: dict[str, Any], progress: Any, window: Any) -> None:
        self.fabric, self.state, self.progress, self.window = fabric, state, progress, window
        self.last = run_dir / "checkpoints" / "last.ckpt"
        self.best = run_dir / "checkpoints" / "best.ckpt"
        self.saved_step: Optional[int] = None
        self.format = CHECKPOINT_FORMAT  # a resumed run keeps its checkpoints' format (see TRANSPOSED_SINCOS_FORMAT)

    def save_last(self, unless_saved: bool = False) -> None:
        if unless_saved and self.saved_step == self.progress.step:
            return
        self.progress.window = self.window.state_dict()
        tmp = self.last.with_name(self.last.name + ".tmp")
        self.fabric.save(tmp, {"format": self.format, **self.state, "rng": capture_rng_state()})
        self.fabric.barrier()
        if self.fabric.is_global_zero:
            fsync_and_replace(tmp, self.last)
        self.fabric.barrier()
        self.saved_step = self.progress.step

    def save_best(self) -> None:
        if self.fabric.is_global_zero:
            copy_atomic(self.last, self.best)

    def resume(self, path: Path) -> None:
        """Load ``path`` into the state (checked key by key first), restore the RNG streams and the window, and
        redo a ``best.ckpt`` copy that a kill cut off."""
        ckpt = read_checkpoint(path)
        check_state_dict(self.state["model"], ckpt["model"], str(path), resizable=())
        missing = [k for k in self.state if k not in ckpt]
        if missing:
            raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it was written by another task "
                            f"({ckpt.get('config', {}).get('task', {}).get('name')}) and cannot resume this one")
        rng, self.format = ckpt["rng"], ckpt.get("format", CHECKPOINT_FORMAT)
        del ckpt
        remainder = self.fabric.load(path, self.state)
        remainder.pop("rng", None)
        restore_rng_state(rng)
        # Fabric rebuilds dataclasses while unwrapping the state, so the loaded counters may sit in a copy.
        self.progress.load_state_dict(self.state["progress"].state_dict())
        self.state["progress"] = self.progress
        self.window.load_state_dict(self.progress.window)
        self.saved_step = self.progress.step
        if self.fabric.is_global_zero:
            self._restore_best(path)

    def _restore_best(self, resumed: Path) -> None:
        """``progress.best_step`` is the step of the best evaluation; when it is the resumed checkpoint's own step,
        ``best.ckpt`` must hold that step too (a kill between writing ``last.ckpt`` and copying it)."""
        step = self.progress.step
        if self.progress.best_step != step or (self.best.exists() and self.best.samefile(resumed)):
            return
        try:
            held = (peek_checkpoint(self.best).get("progress") or {}).get("step") if self.best.exists() else None
        except CheckpointError:
            held = None  # unreadable: replaced
        if held != step:
            copy_atomic(resumed, self.best)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    fsync_and_replace(tmp, dst)


def check_resumable(path: Path, saved: Mapping[str, Any], cfg: DictConfig) -> None:
    """A training checkpoint whose config differs from ``cfg`` only where a resume may change it."""
    if saved.get("format") not in (CHECKPOINT_FORMAT, TRANSPOSED_SINCOS_FORMAT) or not isinstance(saved.get("config"),
                                                                                               dict):
        raise UserError(f"{path} is not a pixelformer training checkpoint (format {saved.get('format')!r}), so a run "
                        f"cannot be resumed from it")
    if cfg.trainer.precision == "auto":  # the run keeps the precision it resolved when it started
        cfg.trainer.precision = saved["config"].get("trainer", {}).get("precision", "auto")
    check_resume_config(saved["config"], cfg, path)


def prepare_run_files(run_dir: Path, cfg: DictConfig, resume_step: Optional[int], final_again: bool = False) -> None:
    """Write ``config.yaml``; on resume, cut ``metrics.jsonl`` back to what the checkpoint had logged.

    ``final_again``: the checkpoint is the final one but the run did not finish (no ``eval.json``), so its final
    evaluation runs again and its earlier record is dropped.
    """
    try:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            # Fresh start: begin a new file. Resume: drop what was logged after the checkpoint, it is logged again.
            keep = []
            for line in metrics.read_text().splitlines() if resume_step is not None else []:
                try:
                    record = json.loads(line)
                    step = record.get("step", 0)
                    if step < resume_step or (step == resume_step and not (final_again and "train/loss" not in record)):
                        keep.append(line + "\n")
                except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
                    continue
            metrics.write_text("".join(keep))
    except OSError as e:  # at start nothing is lost yet: stop with the file's name rather than train unrecorded
        raise UserError(f"cannot write {e.filename or run_dir} ({e.strerror}): make it a writable file, or choose "
                        f"another run.dir") from None


# -------------------------------------------------------------------------------------------------- lock
class RunDirLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, whose text names the holder (pid and host).

    The kernel drops the lock when its holder exits, however it dies, so a lock file left behind never blocks.
    On network filesystems Linux maps ``flock`` to POSIX record locks, which NFS shares between hosts.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / ".lock"
        self._fd: Optional[int] = None

    def _in_use(self) -> str:
        try:
            holder = self.path.read_text().split()
        except OSError:
            holder = []
        who = f"pid {holder[0]} ({' '.join(holder[1:])})" if holder else "another process"
        return (f"run directory {self.run_dir} is in use by {who}: wait for that run to end, or choose another "
                f"run.dir")

    def check(self) -> None:
        """Raise a :class:`UserError` if another process holds the lock (a shared probe: callers never collide)."""
        if fcntl is None or not self.path.exists():
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # unreadable: the acquisition after launch decides
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(self._in_use()) from None
        finally:
            os.close(fd)  # also drops the probe's shared lock

    def acquire(self) -> Optional[str]:
        """Take the lock; returns ``None``, or the message saying who holds it."""
        if fcntl is None:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._in_use()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock; the file stays, stale and harmless
            self._fd = None
