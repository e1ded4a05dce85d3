"""Run tracking: metrics.jsonl always, W&B offline without an account, and a failing logger never stops training."""
import time
import warnings

import pytest

from pixelformer.engine import fit
from pixelformer.tracking import SafeLogger
from conftest import tiny_cfg


def test_wandb_offline_writes_a_local_run(run_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(run_dir))
    cfg = tiny_cfg(run_dir, "trainer.max_steps=3", "trainer.log_every_steps=1", "logger=offline")
    fit(cfg)
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run directory"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4  # 3 train records + final eval


def wandb_record(run_dir, complete, timeout_s: float = 60.0) -> bytes:
    """The offline run's record once ``complete(data)`` holds: W&B's service process writes it, and on a loaded
    machine it may still be writing when ``finish()`` has returned (seen once with the CPU shared: the header alone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        (record,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        data = record.read_bytes()
        if complete(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.5)


@pytest.mark.slow
def test_checkpoints_are_uploaded_as_wandb_artifacts_when_asked(run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(run_dir))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B's staging copies, not in $HOME
    fit(tiny_cfg(run_dir, "trainer.max_steps=4", "trainer.eval_every_steps=2", "logger=offline",
                 "logger.log_checkpoints=true"))
    data = wandb_record(run_dir, lambda data: data.count(b"last.ckpt") >= 2 and b"architecture" in data)
    assert data.count(b"last.ckpt") == 2 and b"model-" in data  # the evaluations at steps 2 and 4
    assert b"architecture" in data and b"heads" in data  # the resolved architecture is in the run's config
    # without the switch nothing is uploaded
    monkeypatch.setenv("WANDB_DIR", str(run_dir / "plain"))
    fit(tiny_cfg(run_dir / "plain", "trainer.max_steps=2", "logger=offline"))
    assert b"last.ckpt" not in wandb_record(run_dir / "plain", lambda data: b"architecture" in data)


def test_online_without_api_key_falls_back_to_local_metrics(run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.warns(UserWarning, match="no W&B API key"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=2", "logger=online"))
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "eval.json").exists()


class ExplodingLogger:
    name, version = "exploding", "0"

    def log_metrics(self, metrics, step=None):
        raise ConnectionError("network is unreachable")


def test_a_failing_logger_warns_once_and_is_dropped():
    logger = SafeLogger(ExplodingLogger())
    with pytest.warns(UserWarning, match="network is unreachable"):
        logger.log_metrics({"a": 1.0}, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"a": 2.0}, step=2)  # silent now
    assert logger.inner is None
