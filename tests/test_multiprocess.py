"""Many processes, correctly: per-rank random streams, every rank's RNG state in checkpoints, bit-exact 2-process
kill-and-resume, resuming on another number of processes, metrics that do not change with the number of
processes, 16-mixed that survives an overflow, SIGHUP, configs that differ between ranks, a finite wait for a
process that hangs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from pixelformer import rng
from pixelformer.checkpoint import read_checkpoint
from pixelformer.data import ShardedEpochSampler
from pixelformer.engine import TrainingInterrupted, fit
from conftest import QUIET, REPO, TINY_MODEL, on_step, tiny_cfg, run_process, spawn

FAST = ("data.limit_train=128", "data.limit_test=33", "data.batch_size=16")
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")


def train_process(*args, env=None):
    return spawn([sys.executable, str(REPO / "tools" / "train.py"), *args], cwd=REPO,
                 env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc, run_dir, step, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ the streams
def test_each_rank_gets_its_own_stream_and_rank_zero_keeps_the_seed():
    assert rng.rank_seed(7, 0) == 7
    seeds = {rng.rank_seed(7, r) for r in range(1, 9)} | {rng.rank_seed(8, r) for r in range(1, 9)}
    assert len(seeds) == 16 and 7 not in seeds and all(0 <= s < 2 ** 63 for s in seeds)
    draws = []
    for rank in (0, 1, 2):
        torch.manual_seed(7)
        init = torch.rand(3)  # model initialisation: before the switch, the same on every rank
        rng.seed_process_streams(7, rank)
        draws.append((init, torch.rand(4)))
    assert all(torch.equal(draws[0][0], d[0]) for d in draws)
    assert not torch.equal(draws[0][1], draws[1][1]) and not torch.equal(draws[1][1], draws[2][1])
    torch.manual_seed(7)
    torch.rand(3)
    assert torch.equal(torch.rand(4), draws[0][1])  # rank 0: the one-process stream, unchanged


def test_per_sample_draws_do_not_depend_on_the_batch_they_are_in():
    seeds = [11, 12, 13, 14]
    with rng.per_sample_seeds(seeds):
        whole = (rng.rand((4, 5)), rng.randn((4, 2, 3)), rng.randint(1000, (4,)))
    with rng.per_sample_seeds(seeds[2:]):
        tail = (rng.rand((2, 5)), rng.randn((2, 2, 3)), rng.randint(1000, (2,)))
    for a, b in zip(whole, tail):
        assert torch.equal(a[2:], b)
    state = torch.get_rng_state()
    with rng.per_sample_seeds(seeds):
        rng.randn_like(torch.zeros(4, 3))
    assert torch.equal(state, torch.get_rng_state())  # the process stream is left alone
    with pytest.raises(ValueError, match="4 seeds for a draw of 3 rows"), rng.per_sample_seeds(seeds):
        rng.rand((3, 2))


def test_a_resumed_epoch_skips_what_every_shard_has_seen():
    full = [i for _, i in ShardedEpochSampler(20, shuffle=True, seed=3)]
    two = [ShardedEpochSampler(20, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [i for s in two for i in list(x for _, x in s)[:4]]  # 4 samples each: 8 of the epoch
    assert sorted(seen) == sorted(full[:8])
    for s in two:  # the same processes: each shard goes on where it stopped
        before = [i for _, i in s][4:]
        s.set_position(0, skip=8)
        assert [i for _, i in s] == before
    three = [ShardedEpochSampler(20, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.set_position(0, skip=8)
    rest = [i for s in three for _, i in s]
    assert set(rest) == set(full[8:]) and len({len(s) for s in three}) == 1  # the unseen 12, 4 per shard


# ------------------------------------------------------------------------------------------ evaluation
@pytest.mark.slow
def test_test_losses_do_not_change_with_the_number_of_processes(tmp_path):
    run_dir = tmp_path / "mae"
    fit(tiny_cfg(run_dir, *FAST, "task=mae", "trainer.max_steps=2"))
    one = json.loads((run_dir / "eval.json").read_text())["metrics"]["test/recon_loss"]  # 1 process
    out = tmp_path / "eval2.json"
    proc = run_process([sys.executable, str(REPO / "tools" / "eval.py"),
                           f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.devices=2", "trainer.accelerator=cpu", f"out={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # written and printed once, not once per process
    assert json.loads(out.read_text())["metrics"]["test/recon_loss"] == pytest.approx(one, rel=1e-6)


@pytest.mark.slow
def test_the_vae_latent_scale_does_not_change_with_the_number_of_processes(tmp_path):
    # The scaling factor a latent DiT trains with: the std of posterior draws for training images 0..39, each image's
    # draw seeded by the image; with 2 processes the images are dealt round-robin and the last batches are partial.
    run_dir = tmp_path / "vae"
    fit(tiny_cfg(run_dir, *FAST, "task=vae", "task.block_out_channels=[8,16]", "task.norm_num_groups=8",
                 "task.scale_images=40", "trainer.max_steps=2"))
    one = json.loads((run_dir / "eval.json").read_text())["metrics"]
    out = tmp_path / "eval2.json"
    proc = run_process([sys.executable, str(REPO / "tools" / "eval.py"), f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                        "trainer.devices=2", "trainer.accelerator=cpu", f"out={out}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())["metrics"]
    assert two["test/latent_std"] == pytest.approx(one["test/latent_std"], rel=1e-6)
    assert two["test/mse"] == pytest.approx(one["test/mse"], rel=1e-6)


# ------------------------------------------------------------------------------------------ exact resume
DDP_RESUME = (*QUIET, *TINY_MODEL, *FAST, *DDP, "trainer.precision=32-true", "trainer.eval_every_epochs=null",
              "trainer.log_every_steps=1", "trainer.max_steps=40", "model.drop_path_rate=0.2")


@pytest.mark.slow
def test_two_process_kill_and_resume_is_bit_exact(tmp_path):
    # MAE with drop path: every rank draws masks and dropout masks from its own stream. (DiT's timesteps, noise and
    # label drops come from the same per-process streams, saved and restored alike; its EMA resumes in test_fsdp.)
    args = (*DDP_RESUME, "task=mae")
    # the uninterrupted run and the one to be stopped side by side (their results do not depend on the timing)
    straight = train_process(*args, f"run.dir={tmp_path / 'straight'}")
    run_dir = tmp_path / "stopped"
    proc = train_process(*args, f"run.dir={run_dir}")
    wait_for_step(proc, run_dir, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    straight_out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_out[-3000:]
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    stopped_at = ckpt["progress"]["step"]
    assert 3 <= stopped_at < 40
    states = ckpt["rng"]
    assert isinstance(states, list) and len(states) == 2
    assert not torch.equal(states[0]["torch"], states[1]["torch"])  # the ranks draw from their own streams

    proc = train_process(f"run.dir={run_dir}", "resume=auto", "trainer.progress_bar=false")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "cannot continue exactly" not in out
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    for key in ("model", "ema"):
        for name in a.get(key, {}):
            assert torch.equal(a[key][name], b[key][name]), (key, name, stopped_at)
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))
    # resumed on another number of processes: allowed, said once, and the run goes on
    proc = train_process(f"run.dir={run_dir}", "resume=auto", "trainer.max_steps=43", "trainer.devices=1",
                         "trainer.strategy=auto", "trainer.progress_bar=false")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "cannot continue exactly" in line]
    assert len(warnings) == 1 and "on 1 process(es) a run saved with 2" in warnings[0], out[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["progress"]["step"] == 43


# ------------------------------------------------------------------------------------------ logged means
class _TwoRanks:
    """What MetricsWindow needs of Fabric, for 2 processes whose other rank summed ``other``."""
    world_size, device = 2, torch.device("cpu")

    def __init__(self, other):
        self.other = other

    def all_reduce(self, x, reduce_op):
        assert reduce_op == "mean"
        return (x + self.other) / 2


def test_logged_training_values_are_the_mean_over_ranks():
    from pixelformer.trainer import MetricsWindow

    window = MetricsWindow(_TwoRanks(torch.tensor([4.0, 1.0])))  # the other rank: grad_norm 4, loss 1 (sorted keys)
    window.add_micro_batch({"loss": torch.tensor(3.0)})
    window.add_step(torch.tensor(2.0))
    logged = window.averages(images_per_step=32)
    assert logged["train/loss"] == 2.0 and logged["train/grad_norm"] == 3.0
    assert window.state_dict()["sums"] == {"grad_norm": 3.0, "loss": 2.0}  # a checkpoint keeps the mean too


# ------------------------------------------------------------------------------------------ 16-mixed
def test_a_float16_overflow_skips_one_step_and_the_run_goes_on(run_dir, monkeypatch, capsys):
    from pixelformer.trainer import Trainer

    original = Trainer.micro_step
    poisoned = []

    def micro_step(self, batch, accumulating):
        result = original(self, batch, accumulating)
        if self.progress.step == 2 and not poisoned:  # the gradients of step 3 overflow float16
            next(p for p in self.raw_module.parameters() if p.grad is not None).grad.fill_(float("inf"))
            poisoned.append(self.scaler.get_scale())
        return result
    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    scales = {}

    def hook(trainer, step):
        if step == 1:  # a scale at which this model's gradients fit float16 (65536 overflows now and then)
            trainer.scaler.update(1024.0)
        scales.setdefault(step, trainer.scaler.get_scale())
    on_step(monkeypatch, hook)
    cfg = tiny_cfg(run_dir, *FAST, "trainer.precision=16-mixed", "trainer.max_steps=5", "trainer.log_every_steps=1",
                   "optim.fused=true")
    fit(cfg)
    assert scales[3] == poisoned[0] / 2 and scales[2] == poisoned[0]  # the scale backed off once
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["progress"]["step"] == 5 and ckpt["progress"]["overflow_steps"] == 1
    assert ckpt["scaler"]["scale"] == scales[5]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "float16 overflow at step 3: update skipped, loss scale lowered to 512" in capsys.readouterr().out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/overflow_steps"] for r in records if "train/overflow_steps" in r][-1] == 1
    assert ckpt["config"]["trainer"]["precision"] == "16-mixed"


def test_a_resumed_16_mixed_run_keeps_its_loss_scale(run_dir, monkeypatch):
    def stop(trainer, step):
        if step == 2:
            trainer.scaler.update(123.0)  # a scale no fresh scaler has, saved in the step-2 checkpoint
        if step == 3:
            raise KeyboardInterrupt
    on_step(monkeypatch, stop)
    args = (*FAST, "trainer.precision=16-mixed", "trainer.max_steps=5", "trainer.ckpt_every_steps=1")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_cfg(run_dir, *args))
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["scaler"]["scale"] == 123.0
    monkeypatch.undo()
    seen = {}
    on_step(monkeypatch, lambda trainer, step: seen.setdefault(step, trainer.scaler.get_scale()))
    fit(tiny_cfg(run_dir, *args, "resume=auto"))
    assert seen == {3: 123.0, 4: 123.0, 5: 123.0}


@pytest.mark.slow
def test_consecutive_overflows_stop_the_run_with_the_last_good_checkpoint(run_dir, monkeypatch):
    from pixelformer.trainer import NonFiniteLossError, Trainer

    original = Trainer.micro_step

    def micro_step(self, batch, accumulating):
        result = original(self, batch, accumulating)
        if self.progress.step >= 2:
            next(p for p in self.raw_module.parameters() if p.grad is not None).grad.fill_(float("nan"))
        return result
    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    cfg = tiny_cfg(run_dir, *FAST, "trainer.precision=16-mixed", "trainer.max_steps=60", "trainer.ckpt_every_steps=1")
    with pytest.raises(NonFiniteLossError, match=r"25 consecutive float16 overflows at step 3 .* Last good "
                                                 r"checkpoint: .*last.ckpt"):
        fit(cfg)
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["progress"]["step"] == 2


def test_fused_adamw_is_kept_off_where_fsdps_sharded_scaler_runs():
    from omegaconf import OmegaConf

    from pixelformer import UserError
    from pixelformer.optim import build_optimizer

    cfg = OmegaConf.create({"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "layer_decay": None,
                            "betas": [0.9, 0.999], "fused": None, "momentum": 0.9})
    module = torch.nn.Linear(2, 2)
    assert build_optimizer(module, cfg, torch.device("cpu")).defaults["fused"]
    assert not build_optimizer(module, cfg, torch.device("cpu"), fused_allowed=False).defaults["fused"]
    cfg.fused = True
    with pytest.raises(UserError, match="optim.fused=true cannot run under trainer.strategy=fsdp with trainer."
                                        "precision=16-mixed .*: set optim.fused=null or trainer.precision=bf16-mixed"):
        build_optimizer(module, cfg, torch.device("cpu"), fused_allowed=False)


def test_a_timeout_that_is_not_positive_is_refused():
    from pixelformer import UserError

    with pytest.raises(UserError, match=r"trainer.dist_timeout_s must be a positive number of seconds \(default "
                                        r"1800\), got 0"):
        tiny_cfg("unused", "trainer.dist_timeout_s=0")


# ------------------------------------------------------------------------------------------ signals, configs
@pytest.mark.slow
def test_sighup_stops_like_sigterm_with_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_process(*QUIET, *TINY_MODEL, *FAST, "trainer.precision=32-true", "trainer.max_steps=400",
                         "trainer.eval_every_epochs=null", "trainer.log_every_steps=1", f"run.dir={run_dir}")
    wait_for_step(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGHUP)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 129, out[-3000:]
    assert "stopped by SIGHUP at step" in out
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["progress"]["step"] >= 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _external_ranks(tmp_path, per_rank_args, extra=()):
    """Two processes started as a cluster launcher starts them (each with its own RANK), not by Fabric."""
    port = _free_port()
    procs = []
    for rank, own in enumerate(per_rank_args):
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "NODE_RANK": "0"}
        procs.append(train_process(*QUIET, *TINY_MODEL, *FAST, *DDP, "trainer.precision=32-true",
                                   f"run.dir={tmp_path / 'run'}", *extra, *own, env=env))
    return procs


@pytest.mark.slow
def test_ranks_started_with_different_configs_are_refused_not_hung(tmp_path):
    procs = _external_ranks(tmp_path, [["data.limit_train=128"], ["data.limit_train=96"]],
                            extra=("trainer.max_steps=4", "trainer.dist_timeout_s=60"))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 2, out[-3000:]
        line = next(line for line in out.splitlines() if line.startswith("error:"))
        assert "the 2 processes were started with different configs: data.limit_train (128 / 96)" in line


@pytest.mark.slow
def test_a_hung_process_ends_its_peers_wait_with_a_message(tmp_path):
    procs = _external_ranks(tmp_path, [[], []], extra=("trainer.max_steps=100000", "trainer.dist_timeout_s=5",
                                                       "trainer.log_every_steps=1", "trainer.eval_every_epochs=null"))
    wait_for_step(procs[0], tmp_path / "run", 2)
    os.kill(procs[1].pid, signal.SIGSTOP)  # rank 1 hangs
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 2, out[-3000:]
    assert "waited more than trainer.dist_timeout_s=5 s for the others" in out, out[-3000:]


@pytest.mark.slow
def test_a_signal_reaches_a_process_blocked_in_a_collective(tmp_path):
    procs = _external_ranks(tmp_path, [[], []], extra=("trainer.max_steps=100000", "trainer.dist_timeout_s=600",
                                                       "trainer.log_every_steps=1", "trainer.eval_every_epochs=null"))
    wait_for_step(procs[0], tmp_path / "run", 2)
    os.kill(procs[1].pid, signal.SIGSTOP)
    time.sleep(2)  # rank 0 is now waiting for rank 1 inside an all-reduce
    started = time.time()
    try:
        os.kill(procs[0].pid, signal.SIGTERM)
        time.sleep(0.5)
        os.kill(procs[0].pid, signal.SIGTERM)  # a second one while the first is still unhandled: exit at once
        out, _ = procs[0].communicate(timeout=60)
    finally:
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 143 and time.time() - started < 30, out[-3000:]
    assert "received while this process was blocked" in out and "last.ckpt" in out
