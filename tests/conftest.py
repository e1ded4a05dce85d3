"""Shared test helpers: tiny configs and tiny datasets written by the tests themselves."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never talk to W&B unless a test asks for it; the tracking tests set the mode themselves.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

TINY_MODEL = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2"]
QUIET = ["trainer.progress_bar=false", "trainer.accelerator=cpu", "logger=disabled"]


def tiny_cfg(run_dir: Path, *overrides: str):
    """A composed config for a seconds-long run on digits with a 1-block, 32-wide pixel transformer."""
    from pixelformer.config import compose

    return compose([*QUIET, *TINY_MODEL, f"run.dir={run_dir}", "trainer.precision=32-true",
                    "trainer.eval_every_epochs=null", *overrides])


def on_step(monkeypatch, hook) -> None:
    """Call ``hook(trainer, step)`` after each optimizer step, once the trainer's own bookkeeping (EMA, log) is done."""
    from pixelformer.trainer import Trainer

    original = Trainer.after_step

    def after_step(self, grad_norm):
        original(self, grad_norm)
        hook(self, self.progress.step)
    monkeypatch.setattr(Trainer, "after_step", after_step)


def run_tool(tool: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tools/<tool>.py`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def write_fake_cifar(root: Path, num_classes: int, n_train: int = 40, n_test: int = 20, seed: int = 0) -> Path:
    """CIFAR files in torchvision's on-disk format (python pickles), with random pixels and labels."""
    rng = np.random.default_rng(seed)
    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        per_batch = n_train // 5
        for i in range(1, 6):
            batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                     "labels": rng.integers(0, 10, per_batch).tolist()}
            (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
        test = {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n_test).tolist()}
        (folder / "test_batch").write_bytes(pickle.dumps(test))
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split, n in (("train", n_train), ("test", n_test)):
            entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": rng.integers(0, 20, n).tolist()}
            (folder / split).write_bytes(pickle.dumps(entry))
        meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
