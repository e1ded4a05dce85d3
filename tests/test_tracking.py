"""Run tracking: metrics.jsonl always, W&B offline without an account, and a failing logger never stops training."""
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


@pytest.mark.slow
def test_checkpoints_are_uploaded_as_wandb_artifacts_when_asked(run_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(run_dir))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # W&B's staging copies, not in $HOME
    fit(tiny_cfg(run_dir, "trainer.max_steps=4", "trainer.eval_every_steps=2", "logger=offline",
                 "logger.log_checkpoints=true"))
    (record,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert data.count(b"last.ckpt") == 2 and b"model-" in data  # the evaluations at steps 2 and 4
    assert b"architecture" in data and b"heads" in data  # the resolved architecture is in the run's config
    # without the switch nothing is uploaded
    monkeypatch.setenv("WANDB_DIR", str(run_dir / "plain"))
    fit(tiny_cfg(run_dir / "plain", "trainer.max_steps=2", "logger=offline"))
    (plain,) = (run_dir / "plain" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"last.ckpt" not in plain.read_bytes()


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
