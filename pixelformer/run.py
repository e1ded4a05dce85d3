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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import (TRANSPOSED_SINCOS_FORMAT, capture_rng_state, check_state_dict, fsync_and_replace,
                         read_checkpoint, restore_rng_state)
from .config import GROUPS, compose, compose_saved, to_plain, validate
from .errors import CheckpointError, UserError
from .distributed import every_rank
from .rng import reseed_process_streams

if TYPE_CHECKING:
    from lightning.fabric import Fabric

try:  # POSIX only; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["CHECKPOINT_FORMAT", "RESUMABLE_KEYS", "Checkpointer", "RunDirLock", "check_resumable",
           "check_resume_config", "compose_for_resume", "flatten", "peek_checkpoint",
           "prepare_run_files", "resolve_resume", "resume_source"]

CHECKPOINT_FORMAT = "pixelformer-checkpoint/2"  # 1: before the sin-cos layout fix (still resumable, with a warning)

# Config keys that a resume may change (a trailing dot: a whole section); check_resume_config says why.
RESUMABLE_KEYS: tuple[str, ...] = (
    "resume", "init_from", "run.dir", "logger.",
    "trainer.progress_bar", "trainer.log_every_steps", "trainer.eval_every_steps", "trainer.eval_every_epochs",
    "trainer.ckpt_every_steps", "trainer.max_steps", "trainer.max_epochs", "trainer.grad_clip",
    "trainer.skip_nonfinite_steps", "trainer.accelerator", "trainer.strategy", "trainer.precision",
    "trainer.compile", "trainer.grad_checkpointing", "trainer.deterministic", "trainer.cpu_allocator",
    "trainer.memory_check", "trainer.devices", "trainer.num_nodes", "trainer.dist_timeout_s",
    "optim.fused", "data.max_image_pixels", "data.root", "data.download", "data.num_workers", "data.on_device",
    "data.eval_batch_size",
)


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
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
      ``data.eval_batch_size``, ``data.max_image_pixels``;
    * ``trainer.devices`` and ``trainer.num_nodes``: the epoch goes on with the samples no process has seen, but the
      global batch is another size and the random streams cannot continue exactly (the run says so);
      ``trainer.dist_timeout_s``.

    Everything else is refused, each changed key named with its old and new value: ``task.*``, ``model.*``,
    ``optim.*`` (the scheduler restores its saved base learning rates, so a new ``optim.lr`` would not be used),
    ``run.seed``, and the keys that fix the batches and where an interrupted epoch resumes (``data.name``,
    ``data.batch_size``, ``data.limit_*``, ``data.augment``, ``trainer.accumulate_grad_batches``, ...).
    """
    old, new = flatten(saved), flatten(to_plain(cfg))
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
            keys += [f"{key}.{k}" for k in flatten(to_plain(cfg[key]))]
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
    one; ``best.ckpt`` is an atomic copy of it. Each file carries the format tag and, under ``rng``, a list of
    every process's RNG states (index = global rank).
    """

    #: Entries a checkpoint may lack: the loss scaler of a 16-mixed run resumed from a run in another precision.
    OPTIONAL = ("scaler",)

    def __init__(self, fabric: Fabric, run_dir: Path, state: dict[str, Any], progress: Any, window: Any,
                 reference: Optional[tuple[Any, Mapping[str, torch.Tensor]]] = None) -> None:
        """``reference``: the unwrapped module and its full state dict (meta tensors will do), which a checkpoint
        is checked against before loading; by default ``state["model"]`` (whose state dict an FSDP wrapper would
        give as shards)."""
        self.fabric, self.state, self.progress, self.window = fabric, state, progress, window
        self.reference = reference
        self.last = run_dir / "checkpoints" / "last.ckpt"
        self.best = run_dir / "checkpoints" / "best.ckpt"
        self.saved_step: Optional[int] = None
        self.format = CHECKPOINT_FORMAT  # a resumed run keeps its checkpoints' format (see TRANSPOSED_SINCOS_FORMAT)

    def save_last(self, unless_saved: bool = False) -> None:
        if unless_saved and self.saved_step == self.progress.step:
            return
        self.progress.window = self.window.state_dict()
        tmp = self.last.with_name(self.last.name + ".tmp")
        rng = every_rank(self.fabric, capture_rng_state(self.fabric.device))  # a collective: before the write
        try:
            self.fabric.save(tmp, {"format": self.format, **self.state, "rng": rng})
        except (OSError, RuntimeError) as e:
            self._write_failed(tmp, e)
        self.fabric.barrier()
        if self.fabric.is_global_zero:
            try:
                fsync_and_replace(tmp, self.last)
            except OSError as e:
                self._write_failed(tmp, e)
        self.fabric.barrier()
        self.saved_step = self.progress.step

    def _write_failed(self, tmp: Path, error: Exception) -> None:
        """A checkpoint that cannot be written (a full disk, a read-only folder) ends the run in one line naming the
        file and the last good checkpoint, which the atomic write left intact; anything else is re-raised."""
        writer = ("PytorchStreamWriter", "inline_container", "file write failed")  # torch's own writer's I/O errors
        if isinstance(error, RuntimeError) and not any(w in str(error) for w in writer):
            raise error
        try:
            tmp.unlink(missing_ok=True)  # a partial file: give back the space
        except OSError:
            pass
        reason = error.strerror if isinstance(error, OSError) and error.strerror else \
            " ".join(str(error).split())[:200]
        kept = (f"the last good checkpoint, {self.last} (step {self.saved_step}), is intact"
                if self.saved_step is not None and self.last.is_file() else "no earlier checkpoint was written")
        raise UserError(f"cannot write checkpoint {self.last} at step {self.progress.step} ({reason}): {kept}; free "
                        f"space or make {self.last.parent} writable, then resume with resume=auto") from None

    def save_best(self) -> None:
        if self.fabric.is_global_zero:
            copy_atomic(self.last, self.best)

    def resume(self, path: Path) -> None:
        """Load ``path`` into the state (checked key by key first), restore the RNG streams and the window, and
        redo a ``best.ckpt`` copy that a kill cut off."""
        ckpt = read_checkpoint(path)
        module, expected = self.reference if self.reference is not None else (self.state["model"], None)
        check_state_dict(module, ckpt["model"], str(path), resizable=(), expected=expected)
        missing = [k for k in self.state if k not in ckpt and k not in self.OPTIONAL]
        if missing:
            raise UserError(f"checkpoint {path} lacks {', '.join(missing)}: it was written by another task "
                            f"({ckpt.get('config', {}).get('task', {}).get('name')}) and cannot resume this one")
        rng, self.format = ckpt["rng"], ckpt.get("format", CHECKPOINT_FORMAT)
        saved_devices = (ckpt.get("config") or {}).get("trainer", {}).get("devices")
        loaded = {k: v for k, v in self.state.items() if k in ckpt}  # e.g. no scaler: a run that was not 16-mixed
        del ckpt
        remainder = self.fabric.load(path, loaded)
        for key in ("rng", *self.OPTIONAL):
            remainder.pop(key, None)  # a scaler saved by a 16-mixed run resumed in another precision is dropped
        self.restore_rng(rng, saved_devices)
        # Fabric rebuilds dataclasses while unwrapping the state, so the loaded counters may sit in a copy.
        self.progress.load_state_dict(loaded["progress"].state_dict())
        self.state["progress"] = self.progress
        self.window.load_state_dict(self.progress.window)
        self.saved_step = self.progress.step
        if self.fabric.is_global_zero:
            self._restore_best(path)

    def restore_rng(self, saved: Any, saved_devices: Any) -> None:
        """Each process continues its own saved streams. A checkpoint of another number of processes (or one
        written before per-process states: a single state) cannot continue them: each process then starts a
        fresh stream of ``(run.seed, rank, step)`` and rank 0 says so, once."""
        fabric, step = self.fabric, self.progress.step
        states = saved if isinstance(saved, list) else [saved]
        if len(states) == fabric.world_size:
            restore_rng_state(states[fabric.global_rank], fabric.device)
            return
        seed = int((self.state.get("config") or {}).get("run", {}).get("seed", 0))
        reseed_process_streams(seed, fabric.global_rank, step)
        fabric.print(f"warning: resuming on {fabric.world_size} process(es) a run saved with "
                     f"{saved_devices if not isinstance(saved, list) else len(states)}: the random streams (masks, "
                     f"noise, dropout) cannot continue exactly; each process starts a fresh one at step {step}")

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
    if cfg.run.dir is not None:
        check_config_file(Path(cfg.run.dir).expanduser() / "config.yaml", saved["config"], cfg, path)


def check_config_file(config_file: Path, saved: Mapping[str, Any], cfg: DictConfig, source: Path) -> None:
    """Say when the run directory's ``config.yaml`` was edited: a key that differs both from the checkpoint's
    ``saved`` config and from the config the resume runs with (``cfg``), rather than overwriting the edit without a
    word. (A key the command line changes differs from the checkpoint only; it is not an edit.)

    A resume never reads ``config.yaml``: the checkpoint's config is the run's. A differing key that a resume may
    not change (a recipe key) is refused, so that nobody believes the edit took effect; one it may change
    (``trainer.max_steps``, ``logger.*``, ...; also what a resume that stopped before its first checkpoint wrote)
    is named in a warning with the argument that applies it. ``run.dir`` and ``resume`` are not compared.
    """
    if not config_file.is_file():
        return
    try:
        written = OmegaConf.to_container(OmegaConf.load(config_file), resolve=False)
    except Exception as e:  # noqa: BLE001 - YAML errors, unsafe tags, bad bytes: the file is rewritten anyway
        print(f"warning: cannot read {config_file} ({' '.join(str(e).split())[:200]}): it is rewritten with the "
              f"config of {source}, which the resume runs with", file=sys.stderr)
        return
    if not isinstance(written, dict):
        return
    ignored = ("run.dir", "resume")
    old, new, kept = flatten(written), flatten(to_plain(cfg)), flatten(saved)
    differ = [k for k in sorted(old) if k not in ignored and k in new and k in kept and old[k] != new[k]
              and old[k] != kept[k]]
    unknown = [k for k in sorted(old) if k not in new and k not in kept]
    recipe = [k for k in differ if not _resumable(k)]
    if recipe:
        listed = ", ".join(f"{k} ({old[k]} in config.yaml, {new[k]} in the run)" for k in recipe)
        raise UserError(f"{config_file} was edited: {listed}; a resume runs with the config saved in {source} and "
                        f"keeps its recipe, so the edit would be ignored and overwritten: revert it (or delete "
                        f"config.yaml, which is rewritten), or start a new run.dir with the changed keys")
    if differ or unknown:
        args = " ".join(f"{k}={_as_argument(old[k])}" for k in differ)
        print(f"warning: {config_file} differs from the config this resume runs with (saved in {source}, changed "
              f"by the command line) in {', '.join(differ + unknown)}; config.yaml is not read on resume and is "
              f"rewritten{f': pass {args} to apply it' if args else ''}"
              f"{f' ({len(unknown)} key(s) unknown to this version)' if unknown else ''}", file=sys.stderr)


def _as_argument(value: Any) -> str:
    """``value`` as a ``key=value`` argument writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value).replace(" ", "") if isinstance(value, (list, dict)) else str(value)


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
            # Bytes, not text: a line with a byte that is not UTF-8 (a disk error, a hand edit) is judged by what
            # can be decoded and kept as it was, rather than blocking every resume with a UnicodeDecodeError.
            for line in metrics.read_bytes().splitlines() if resume_step is not None else []:
                try:
                    record = json.loads(line.decode("utf-8", errors="replace"))
                    step = record.get("step", 0)
                    if step < resume_step or (step == resume_step and not (final_again and "train/loss" not in record)):
                        keep.append(line + b"\n")
                except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
                    continue
            metrics.write_bytes(b"".join(keep))
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
