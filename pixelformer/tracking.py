"""Run tracking: a local ``metrics.jsonl`` that is always written, and W&B (online, offline or disabled).

Tracking must never take training down: a W&B logger that fails (no network, no API key, a crash in the service)
warns once and is switched off, and the run carries on with the local file; a ``metrics.jsonl`` that cannot be
written (read-only or full disk) warns once too, and training carries on with its checkpoints.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lightning.fabric.loggers import Logger
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

__all__ = ["JSONLLogger", "SafeLogger", "build_loggers"]


class JSONLLogger(Logger):
    """Appends one JSON object per ``log_metrics`` call to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.failed = False  # set by the first write that fails; nothing is written after it

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)
        if self.failed:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            self.failed = True
            warnings.warn(f"cannot write {self.path} ({e.strerror or e}): metrics are no longer recorded locally "
                          f"(W&B still gets them if it is on); training continues and checkpoints are still "
                          f"written", stacklevel=2)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is written to <run_dir>/config.yaml


class SafeLogger(Logger):
    """Wraps a logger; the first exception it raises is reported once and the logger is dropped."""

    def __init__(self, inner: Logger) -> None:
        super().__init__()
        self.inner: Optional[Logger] = inner

    @property
    def name(self) -> str:
        return self.inner.name if self.inner else "disabled"

    @property
    def version(self) -> str:
        try:
            return str(self.inner.version) if self.inner else ""
        except Exception:
            return ""

    def _guarded(self, what: str, call: Callable[[Logger], Any]) -> Any:
        if self.inner is None:
            return None
        try:
            return call(self.inner)
        except Exception as e:
            warnings.warn(f"{type(self.inner).__name__} failed in {what} ({type(e).__name__}: {e}); it is switched "
                          f"off for the rest of the run, metrics still go to metrics.jsonl", stacklevel=2)
            self.inner = None
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        self._guarded("log_metrics", lambda inner: inner.log_metrics(metrics, step))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_hyperparams", lambda inner: inner.log_hyperparams(params, *args, **kwargs))

    def log_image(self, key: str, images: list, step: Optional[int] = None) -> None:
        if self.inner is not None and hasattr(self.inner, "log_image"):
            self._guarded("log_image", lambda inner: inner.log_image(key=key, images=images, step=step))

    def finalize(self, status: str) -> None:
        self._guarded("finalize", lambda inner: inner.finalize(status))

    def close(self) -> None:
        """End the W&B run this logger started (its Fabric logger leaves it open, and a second ``fit()`` in the same
        process would log into it). Called once the run has ended, however it ended."""
        if self.inner is not None and getattr(self.inner, "_experiment", None) is not None:
            self._guarded("close", lambda inner: inner.experiment.finish())

    def log_checkpoint(self, path: Path, aliases: list[str], step: int) -> None:
        """Upload a checkpoint file as a W&B model artifact (``logger.log_checkpoints=true``); W&B copies the file
        at once, so the next atomic replacement of ``last.ckpt`` does not change what is uploaded."""
        def upload(inner: Logger) -> None:
            import wandb

            run = inner.experiment
            artifact = wandb.Artifact(name=f"model-{run.id}", type="model", metadata={"step": step})
            artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact, aliases=aliases)
        self._guarded("log_checkpoint", upload)

    @property
    def experiment(self) -> Any:
        return self._guarded("experiment", lambda inner: inner.experiment)


def build_loggers(cfg: DictConfig, run_dir: Path, run_name: str) -> list[Logger]:
    """The local JSONL logger, plus W&B unless ``logger.wandb.mode=disabled``."""
    loggers: list[Logger] = [JSONLLogger(run_dir)]
    wandb_cfg = cfg.logger.wandb
    mode = os.environ.get("WANDB_MODE", wandb_cfg.mode)
    if mode == "disabled":
        return loggers
    try:
        from wandb.integration.lightning.fabric import WandbLogger
    except Exception as e:  # wandb missing or broken: local metrics only
        warnings.warn(f"W&B is unavailable ({e}); metrics go to metrics.jsonl only", stacklevel=2)
        return loggers
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        warnings.warn("logger.wandb.mode=online but no W&B API key is configured (run `wandb login` or set "
                      "WANDB_API_KEY); continuing with metrics.jsonl only. Use logger.wandb.mode=offline to keep a "
                      "W&B run to `wandb sync` later.", stacklevel=2)
        return loggers
    wandb_logger = WandbLogger(
        project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name or run_name,
        tags=list(wandb_cfg.tags), save_dir=str(run_dir), offline=mode == "offline", log_model=False,
    )
    loggers.append(SafeLogger(wandb_logger))
    return loggers
