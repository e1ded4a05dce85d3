"""Fault injection: SIGKILL a training process at random moments, resume each time, end where an uninterrupted
run ends. Checkpoints are written every few steps, so some kills land while one is being written."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pixelformer.checkpoint import read_checkpoint
from conftest import QUIET, REPO, TINY_MODEL, spawn

ARGS = [*QUIET, *TINY_MODEL, "trainer.precision=32-true", "trainer.eval_every_steps=50", "trainer.max_steps=150",
        "trainer.ckpt_every_steps=3", "trainer.log_every_steps=5", "data.batch_size=32", "data.augment=crop_flip",
        "model.drop_rate=0.1"]


def start(run_dir, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return spawn([sys.executable, str(REPO / "tools" / "train.py"), *ARGS, f"run.dir={run_dir}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    straight = start(tmp_path / "straight")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out[-3000:]

    rng = random.Random(1234)
    resumed_dir = tmp_path / "resumed"
    kills, steps_at_kill = 0, []
    for attempt in range(4):
        proc = start(resumed_dir, "resume=auto")
        # wait until this attempt is training (or a fixed time has passed), then kill at a random moment
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            last = resumed_dir / "checkpoints" / "last.ckpt"
            if last.exists() and last.stat().st_mtime > time.time() - 1:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        last = resumed_dir / "checkpoints" / "last.ckpt"
        if last.exists():  # never unreadable, whatever the moment of the kill
            steps_at_kill.append(read_checkpoint(last)["progress"]["step"])
    final = start(resumed_dir, "resume=auto")
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out[-3000:]
    assert kills >= 3, f"only {kills} kills landed"
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] < 150, steps_at_kill

    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(pa[key], pb[key])
    metrics = [json.loads((d / "eval.json").read_text())["metrics"] for d in (tmp_path / "straight", resumed_dir)]
    assert metrics[0] == metrics[1]
