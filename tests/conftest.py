"""Shared test helpers: tiny configs and tiny datasets written by the tests themselves."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist each worker gets its share of the cores (torch would start one thread per core in every worker,
# and the processes the tests start inherit the setting).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

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


class Interrupt(Exception):
    """A crash in the middle of a run (not the SIGINT / SIGTERM path, which saves on its own)."""


def stop_at(monkeypatch, step: int) -> None:
    """Raise ``Interrupt`` after optimizer step ``step``, as a process dying there would stop the run."""
    def hook(trainer, at):
        if at == step:
            raise Interrupt()
    on_step(monkeypatch, hook)


def assert_same_weights(run_a: Path, run_b: Path, parts: tuple[str, ...] = ("model",)) -> None:
    """The last checkpoints of two runs hold the same tensors, bit for bit, under ``parts`` (e.g. straight vs resumed)."""
    import torch
    from pixelformer.checkpoint import read_checkpoint

    a, b = (read_checkpoint(run / "checkpoints" / "last.ckpt") for run in (run_a, run_b))
    for part in parts:
        assert a[part].keys() == b[part].keys(), (part, sorted(a[part].keys() ^ b[part].keys()))
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


# ------------------------------------------------------------------------------------------ child processes
# Every process a test starts gets a process group of its own and is killed, with whatever it started (the ranks of
# a two-process run, loader workers), when its test ends: pytest-timeout stops the test, not its children.
_SPAWNED: list[subprocess.Popen] = []


def _terminal_signals() -> None:
    # A suite started under nohup or as a background job passes SIGHUP/SIGINT ignored to its children, and an ignored
    # signal stays ignored: the tests that send them expect the dispositions of a terminal session.
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def spawn(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session (its own process group) with a terminal's signal dispositions, killed at
    the end of the test if still alive."""
    kwargs.setdefault("start_new_session", True)
    kwargs.setdefault("preexec_fn", _terminal_signals)
    proc = subprocess.Popen(cmd, **kwargs)
    _SPAWNED.append(proc)
    return proc


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process's whole group (the leader may be gone while the ranks it started still run)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_process(cmd: list[str], *, timeout: float = 600, check: bool = False, capture_output: bool = False,
                **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose timeout kills the child's whole process group, not just the child."""
    if capture_output:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = spawn(cmd, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        raise
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        kill_group(proc)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def run_tool(tool: str, *args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``tools/<tool>.py`` in a fresh interpreter, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_process([sys.executable, str(REPO / "tools" / f"{tool}.py"), *args], cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ the suite's own rules
def pytest_configure(config: pytest.Config) -> None:
    # setup.cfg's `timeout` is a pytest-timeout option: without the plugin it would be read and silently ignored.
    if not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("the suite's time limit (setup.cfg: timeout) needs pytest-timeout, which is not "
                                "installed: pip install -r requirements.txt (or make test)")
    if not hasattr(config, "workerinput"):  # the controller, not an xdist worker
        config.stash[_RUNS_BEFORE] = _checkout_runs()


_RUNS_BEFORE = pytest.StashKey[set]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The slow tests first (stable otherwise): xdist hands tests out in this order, so the workers end on short
    # tests together instead of one of them finishing a two-minute test alone.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _checkout_runs() -> set[str]:
    return {p.name for p in (REPO / "runs").iterdir()} if (REPO / "runs").is_dir() else set()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Tests write only to temporary folders: a run directory that appeared in the checkout is a test's mistake.
    before = session.config.stash.get(_RUNS_BEFORE, None)
    if before is None:
        return
    new = sorted(_checkout_runs() - before)
    if new:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"a test wrote into the checkout: runs/{', runs/'.join(new)} (give it run.dir=<tmp_path>/...)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
