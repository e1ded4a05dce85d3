"""Losing nothing: best.ckpt after a kill, exact logs across a resume, finished and lost runs, one writer per run
directory, SIGTERM/SIGINT, config changes on resume, a failing metrics file, SLURM, visualisation mode, tool output."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import pixelformer.tasks.cls
from pixelformer import UserError, engine, trainer
from pixelformer import run as rundir
from pixelformer.config import to_plain
from pixelformer.checkpoint import read_checkpoint
from pixelformer.engine import TrainingInterrupted, fit, resolve_run_dir
from pixelformer.tracking import JSONLLogger
from pixelformer.run import RunDirLock, compose_for_resume
from conftest import QUIET, REPO, TINY_MODEL, Interrupt, on_step, run_tool, spawn, stop_at, tiny_cfg

FAST = ("data.limit_train=128", "data.limit_test=32", "data.batch_size=16")


def records(run_dir, drop=("time", "train/images_per_sec")):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]


def ckpt_step(path):
    return read_checkpoint(path)["progress"]["step"]


# ------------------------------------------------------------------------------------------ 1. best.ckpt
def test_a_kill_between_last_and_best_is_repaired_on_resume(run_dir, monkeypatch):
    # Scripted evaluations: step 10 is the best, later ones are worse, so nothing after the kill copies best again.
    scores = iter([50.0, 60.0, 55.0, 40.0])
    monkeypatch.setattr(trainer, "run_evaluation", lambda *args: {"test/acc1": next(scores)})
    copy, copies = rundir.copy_atomic, []

    def killed_at_the_second_copy(src, dst):
        copies.append(dst)
        if len(copies) == 2:
            raise Interrupt()  # the process dies after writing last.ckpt (step 10), before best.ckpt
        copy(src, dst)
    monkeypatch.setattr(rundir, "copy_atomic", killed_at_the_second_copy)
    args = (*FAST, "trainer.max_steps=20", "trainer.eval_every_steps=5")
    with pytest.raises(Interrupt):
        fit(tiny_cfg(run_dir, *args))
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 10
    assert ckpt_step(run_dir / "checkpoints" / "best.ckpt") == 5
    monkeypatch.setattr(rundir, "copy_atomic", copy)
    fit(tiny_cfg(run_dir, *args, "resume=auto"))
    best = read_checkpoint(run_dir / "checkpoints" / "best.ckpt")["progress"]
    assert (best["step"], best["best"]) == (10, 60.0)
    assert json.loads((run_dir / "eval.json").read_text())["best"] == {"test/acc1": 60.0, "step": 10}


# ------------------------------------------------------------------------------------------ 2. exact logs
@pytest.mark.slow
def test_a_resumed_run_logs_the_same_training_records(tmp_path, monkeypatch):
    # Logging windows (every 4 steps) straddle the checkpoint (step 6); two micro-batches per step.
    args = (*FAST, "trainer.max_steps=12", "trainer.log_every_steps=4", "trainer.ckpt_every_steps=6",
            "trainer.accumulate_grad_batches=2", "model.drop_rate=0.1")
    fit(tiny_cfg(tmp_path / "straight", *args))
    stop_at(monkeypatch, 7)
    with pytest.raises(Interrupt):
        fit(tiny_cfg(tmp_path / "resumed", *args))
    monkeypatch.undo()
    fit(tiny_cfg(tmp_path / "resumed", *args, "resume=auto"))
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [4, 8, 12, 12]  # three training records and the final evaluation
    assert resumed == straight


# ------------------------------------------------------------------------------------------ 3. finished run
@pytest.mark.slow
def test_resuming_a_finished_run_returns_its_metrics_without_evaluating(run_dir, monkeypatch):
    args = (*FAST, "trainer.max_steps=4", "trainer.log_every_steps=2")
    metrics = fit(tiny_cfg(run_dir, *args))
    logged, report = (run_dir / "metrics.jsonl").read_text(), (run_dir / "eval.json").read_text()

    def no_evaluation(*args):
        raise AssertionError("a finished run was evaluated again")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "run_evaluation", no_evaluation)
        assert fit(tiny_cfg(run_dir, *args, "resume=auto")) == metrics
    assert (run_dir / "metrics.jsonl").read_text() == logged and (run_dir / "eval.json").read_text() == report

    # killed after the final checkpoint but before eval.json: the final evaluation runs again, logged once
    (run_dir / "eval.json").unlink()
    assert fit(tiny_cfg(run_dir, *args, "resume=auto")) == metrics
    assert records(run_dir) == [{k: v for k, v in json.loads(line).items() if k not in ("time", "train/images_per_sec")}
                                for line in logged.splitlines()]  # the final evaluation once, not twice

    # a longer run continues training
    fit(tiny_cfg(run_dir, *args, "trainer.max_steps=6", "resume=auto"))
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 6
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 6


# ------------------------------------------------------------------------------------------ 4. lost runs
def test_a_run_without_last_ckpt_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"a best checkpoint")
    (run / "metrics.jsonl").write_text('{"step": 40, "train/loss": 1.0}\n{"step": 40, "test/acc1": 90.0}\n')
    for resume in ("resume=auto", "resume=null"):
        with pytest.raises(UserError) as info:
            fit(tiny_cfg(run, "trainer.max_steps=1", resume))
        message = str(info.value)
        assert f"run directory {run} holds" in message and "no last.ckpt" in message
        assert f"resume={run / 'checkpoints' / 'best.ckpt'}" in message and "new run.dir" in message
    assert (run / "checkpoints" / "best.ckpt").read_bytes() == b"a best checkpoint"

    # results but no checkpoint at all
    (run / "checkpoints" / "best.ckpt").unlink()
    for resume in ("resume=auto", "resume=null"):
        with pytest.raises(UserError, match="results .* but no checkpoint to continue it from: choose a new run.dir"):
            fit(tiny_cfg(run, "trainer.max_steps=1", resume))

    # a run killed before its first checkpoint: only resume=auto starts it again
    (run / "metrics.jsonl").write_text('{"step": 5, "train/loss": 1.0}\n')
    with pytest.raises(UserError, match="stopped before its first checkpoint .*: pass resume=auto"):
        fit(tiny_cfg(run, "trainer.max_steps=1"))
    fit(tiny_cfg(run, "trainer.max_steps=1", *FAST, "resume=auto"))
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 1


@pytest.mark.slow
def test_the_suggested_fix_continues_from_best(run_dir):
    args = (*FAST, "trainer.max_steps=4", "trainer.eval_every_steps=2")
    fit(tiny_cfg(run_dir, *args))
    best = run_dir / "checkpoints" / "best.ckpt"
    best_step = ckpt_step(best)
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    with pytest.raises(UserError, match=f"pass resume={best}"):
        fit(tiny_cfg(run_dir, *args, "resume=auto"))
    fit(tiny_cfg(run_dir, *args, f"resume={best}"))
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 4
    steps = [r["step"] for r in records(run_dir) if "train/loss" in r]
    assert steps == sorted(set(steps)) and best_step in (2, 4)


# ------------------------------------------------------------------------------------------ 5. one writer
HOLD_LOCK = """
import sys, time
from pathlib import Path
from pixelformer.run import RunDirLock
assert RunDirLock(Path(sys.argv[1])).acquire() is None
print("locked", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_and_a_dead_holder_does_not_block(run_dir):
    run_dir.mkdir()
    holder = spawn([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in ("resume=auto", "resume=null"):
            with pytest.raises(UserError, match=f"run directory {run_dir} is in use by pid {holder.pid} .*: wait "
                                                f"for that run to end, or choose another run.dir"):
                fit(tiny_cfg(run_dir, "trainer.max_steps=1", resume))
        # the post-launch acquisition (rank 0) says the same
        assert f"in use by pid {holder.pid}" in RunDirLock(run_dir).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)  # left behind by a dead process
    fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=1"))
    assert (run_dir / "eval.json").exists()


# ------------------------------------------------------------------------------------------ 6. signals
@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, whatever the environment left (an ignored SIGINT is respected)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def signal_at(monkeypatch, step, signum, times=1):
    def hook(trainer, at):
        if at == step:
            for _ in range(times):
                # To this thread, so the signal is pending before the call returns and its handler runs before the
                # next one (os.kill may reach one of torch's threads, and two signals then merge into one).
                signal.pthread_kill(threading.main_thread().ident, signum)
    on_step(monkeypatch, hook)


def test_sigint_stops_after_the_step_with_a_checkpoint(python_sigint, run_dir, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal_at(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=10"))
    assert info.value.exit_code == 130
    expected = f"stopped by SIGINT at step 3; resume with: python tools/train.py run.dir={run_dir} resume=auto"
    assert str(info.value) == expected and expected in capsys.readouterr().err
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 3
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_second_signal_aborts_at_once(python_sigint, run_dir, monkeypatch, capfd):
    before = signal.getsignal(signal.SIGINT)
    signal_at(monkeypatch, 3, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt) as info:
        fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=10"))
    assert type(info.value) is KeyboardInterrupt  # not the orderly TrainingInterrupted
    assert "SIGINT received: stopping after this step with a checkpoint (send it again to stop at once)" \
        in capfd.readouterr().err
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) == before


SIGNAL_ARGS = [*QUIET, *TINY_MODEL, *FAST, "trainer.precision=32-true", "trainer.eval_every_epochs=null",
               "trainer.max_steps=200", "trainer.log_every_steps=5", "data.augment=crop_flip", "model.drop_rate=0.1"]


def train_process(*args):
    # A session of its own, so that a signal can go to its whole process group, as SLURM and terminals send it.
    return spawn([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=REPO,
                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True)


def wait_for_records(proc, run_dir, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_saves_even_when_nobody_reads_stderr_any_more(tmp_path):
    # A run started by a script that died (its stderr a pipe nobody reads): the stop message cannot be written, and
    # the stop must still save the step and exit as a stop (it used to end in a BrokenPipeError, rc 1, no checkpoint).
    run_dir = tmp_path / "orphan"
    proc = spawn([sys.executable, str(REPO / "tools" / "train.py"), *SIGNAL_ARGS, f"run.dir={run_dir}"], cwd=REPO,
                 env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_records(proc, run_dir)
    proc.stderr.close()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") >= 10


@pytest.mark.slow
def test_sigterm_saves_and_resume_ends_like_an_uninterrupted_run(tmp_path):
    run_dir = tmp_path / "stopped"
    proc = train_process(*SIGNAL_ARGS, "data.num_workers=1", f"run.dir={run_dir}")
    wait_for_records(proc, run_dir)
    os.killpg(proc.pid, signal.SIGTERM)  # the loader's worker gets it too, and must leave the stop to the trainer
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    step = ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert 10 <= step < 200
    assert f"stopped by SIGTERM at step {step}; resume with: python tools/train.py run.dir={run_dir} resume=auto" \
        in out and "Traceback" not in out
    # the printed command, alone: the run's saved config is used
    proc = train_process(f"run.dir={run_dir}", "resume=auto", "trainer.progress_bar=false")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.ckpt'} at step {step}" in out

    straight = fit(tiny_cfg(tmp_path / "straight", *SIGNAL_ARGS))
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((run_dir / "eval.json").read_text())["metrics"] == straight
    assert records(run_dir) == records(tmp_path / "straight")


@pytest.mark.slow
def test_sigterm_to_one_ddp_process_stops_both_at_the_same_step(tmp_path):
    # Fabric's launcher: the signalled process is rank 0 alone; rank 1 learns of it through the all-reduce.
    run_dir = tmp_path / "ddp"
    proc = train_process(*SIGNAL_ARGS, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         f"run.dir={run_dir}")
    wait_for_records(proc, run_dir, timeout=300)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    step = ckpt_step(run_dir / "checkpoints" / "last.ckpt")
    assert f"stopped by SIGTERM at step {step};" in out and out.count("stopped by SIGTERM") == 1


# ------------------------------------------------------------------------------------------ 7. config changes
@pytest.mark.slow
def test_a_resume_keeps_the_recipe_and_names_each_changed_key(run_dir):
    args = (*FAST, "trainer.max_steps=2")
    fit(tiny_cfg(run_dir, *args))
    last = run_dir / "checkpoints" / "last.ckpt"
    refused = {
        "optim.lr=0.002": "optim.lr (0.001 -> 0.002)",
        "data.batch_size=32": "data.batch_size (16 -> 32)",
        "data.limit_train=64": "data.limit_train (128 -> 64)",
        "optim=mae": "optim.betas ([0.9, 0.999] -> [0.9, 0.95])",
        "run.seed=1": "run.seed (0 -> 1)",
    }
    for change, named in refused.items():
        with pytest.raises(UserError) as info:
            fit(tiny_cfg(run_dir, *args, "resume=auto", change))
        message = str(info.value)
        assert f"cannot resume {last} with a changed" in message and named in message, message
        assert "revert" in message and "new run.dir" in message and "\n" not in message
    with pytest.raises(UserError, match=r"model.depth \(1 -> 2\), optim.name \(adamw -> sgd\): .* revert these"):
        fit(tiny_cfg(run_dir, *args, "resume=auto", "optim.name=sgd", "model.depth=2"))
    with pytest.raises(UserError, match="fewer than the 2 that .* a resumed run may be made longer, not shorter"):
        fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=1", "resume=auto"))

    # allowed: a longer run, logging, intervals, workers, where it runs
    fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=3", "resume=auto", "trainer.log_every_steps=1",
                 "trainer.ckpt_every_steps=1", "data.num_workers=1", "data.eval_batch_size=8", "logger=offline",
                 "trainer.precision=auto"))
    ckpt = read_checkpoint(last)
    assert ckpt["progress"]["step"] == 3 and ckpt["config"]["trainer"]["precision"] == "32-true"


@pytest.mark.slow
def test_a_resume_command_needs_only_the_run_dir(run_dir):
    fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=2", "optim.lr=0.003"))
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["config"]
    short = compose_for_resume([f"run.dir={run_dir}", "resume=auto", "trainer.max_steps=5"])
    assert short.model.depth == 1 and short.optim.lr == 0.003 and short.data.limit_train == 128
    assert short.trainer.max_steps == 5 and short.resume == "auto"
    # restating the original arguments gives the same config
    full = compose_for_resume([*QUIET, *TINY_MODEL, *FAST, f"run.dir={run_dir}", "trainer.precision=32-true",
                               "trainer.eval_every_epochs=null", "trainer.max_steps=2", "optim.lr=0.003",
                               "resume=auto"])
    assert to_plain(full) == {**saved, "resume": "auto"}
    # a group named again counts as setting its whole section
    assert compose_for_resume([f"run.dir={run_dir}", "resume=auto", "model=pit_mini"]).model.depth is None


# ------------------------------------------------------------------------------------------ 8. metrics file
def test_an_unwritable_metrics_file_warns_once_and_training_goes_on(run_dir, monkeypatch):
    logger = JSONLLogger(run_dir)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").mkdir()  # open(..., "a") fails
    with pytest.warns(UserWarning, match="metrics are no longer recorded locally"):
        logger.log_metrics({"a": 1.0}, step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"a": 2.0}, step=2)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("pixelformer.tracking.open", full_disk, raising=False)
    with pytest.warns(UserWarning, match="No space left on device.*training continues") as caught:
        fit(tiny_cfg(run_dir / "run", *FAST, "trainer.max_steps=4", "trainer.log_every_steps=1"))
    assert sum("metrics.jsonl" in str(w.message) for w in caught) == 1
    assert ckpt_step(run_dir / "run" / "checkpoints" / "last.ckpt") == 4


# ------------------------------------------------------------------------------------------ 9. SLURM
def test_slurm_processes_must_share_a_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(engine._RUN_DIR_ENV, "")
    monkeypatch.delenv(engine._RUN_DIR_ENV)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    cfg = tiny_cfg(tmp_path, "run.dir=null")
    with pytest.raises(UserError, match="one of 2 started by SLURM: set run.dir=<shared path>"):
        resolve_run_dir(cfg)
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # Lightning ignores SLURM in an interactive allocation
    assert resolve_run_dir(cfg).name.startswith("cls-pit_mini-digits-")


# ------------------------------------------------------------------------------------------ 10. visualize
def test_pictures_are_drawn_in_eval_mode_without_gradients(run_dir, monkeypatch):
    seen = []

    def visualize(self, module, ctx, out_dir, step):
        seen.append((step, module.training, torch.is_grad_enabled()))
        return []

    def after_step(trainer, step):
        seen.append((step, trainer.module.training, torch.is_grad_enabled()))
    monkeypatch.setattr(pixelformer.tasks.cls.ClassificationTask, "visualize", visualize)
    on_step(monkeypatch, after_step)
    fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=3", "trainer.eval_every_steps=2"))
    assert seen == [(1, True, True), (2, True, True), (2, False, False), (3, True, True), (3, False, False)]


# ------------------------------------------------------------------------------------------ 11. tool output
@pytest.mark.slow
def test_a_build_error_is_printed_without_the_config(run_dir):
    out = run_tool("train", *QUIET, "model=vit_mini", "model.patch_size=3", f"run.dir={run_dir}")
    assert out.returncode == 2 and "img_size 8 is not divisible by patch_size 3" in out.stderr
    assert "Traceback" not in out.stderr and "task:" not in out.stdout and "---" not in out.stdout


@pytest.mark.slow
def test_an_unwritable_metrics_file_at_start_is_one_clear_line(tmp_path):
    # A directory where metrics.jsonl should be: the run stops before training, naming the file, without a traceback.
    run_dir = tmp_path / "run"
    (run_dir / "metrics.jsonl").mkdir(parents=True)
    result = run_tool("train", *QUIET, *TINY_MODEL, "trainer.max_steps=1", f"run.dir={run_dir}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"cannot write {run_dir / 'metrics.jsonl'}" in result.stderr


def test_an_ignored_sigint_stays_ignored(run_dir, monkeypatch):
    # A background job (`cmd &` in a script) starts with SIGINT ignored: a Ctrl-C meant for the shell must not stop it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        signal_at(monkeypatch, 3, signal.SIGINT)
        fit(tiny_cfg(run_dir, *FAST, "trainer.max_steps=5"))
        assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == 5
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
