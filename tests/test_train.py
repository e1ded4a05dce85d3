"""End-to-end runs of the engine with the cls task on digits, in seconds."""
import json

import pytest
import torch

import pixelformer.tasks.cls
from pixelformer import CheckpointError, UserError
from pixelformer.checkpoint import read_checkpoint
from pixelformer.engine import NonFiniteLossError, fit
from conftest import Interrupt, assert_same_weights, run_tool, stop_at, tiny_cfg


@pytest.mark.slow
def test_tiny_training_run_beats_chance(run_dir):
    # 1 block, 32 wide, 8 epochs: 57-66 % over seeds 0-2; chance is 10 %.
    metrics = fit(tiny_cfg(run_dir, "trainer.max_epochs=8", "optim.lr=3e-3", "optim.warmup_epochs=1",
                           "data.batch_size=32", "model.pool=mean"))
    assert metrics["test/acc1"] > 40.0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metrics"]["test/acc1"] == pytest.approx(metrics["test/acc1"])
    assert (run_dir / "config.yaml").exists()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "train/loss" in r]
    assert {"train/lr", "train/images_per_sec", "train/grad_norm"} <= set(train_lines[0])
    assert train_lines[-1]["train/loss"] < train_lines[0]["train/loss"]
    # checkpoints are plain data: weights_only loading works, the config is a plain dict
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, weights_only=True)
        assert isinstance(ckpt["config"], dict) and ckpt["progress"]["step"] == 8 * (1437 // 32)
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


RESUME_ARGS = ("data.limit_train=256", "data.batch_size=32", "data.augment=crop_flip", "model.drop_rate=0.1",
               "trainer.max_steps=30", "trainer.ckpt_every_steps=10", "trainer.eval_every_steps=7")


@pytest.mark.slow
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = fit(tiny_cfg(tmp_path / "straight", *RESUME_ARGS))

    stop_at(monkeypatch, 17)
    with pytest.raises(Interrupt):
        fit(tiny_cfg(tmp_path / "resumed", *RESUME_ARGS))
    assert read_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["progress"]["step"] == 14
    monkeypatch.undo()
    resumed = fit(tiny_cfg(tmp_path / "resumed", *RESUME_ARGS, "resume=auto"))

    assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert straight == resumed
    # the metrics file holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_on_device_data_gives_the_same_run(tmp_path, monkeypatch):
    # Dropout draws from the global RNG and the run ends mid-epoch: any difference in batches or RNG use would show.
    args = ("data.limit_train=256", "data.batch_size=32", "trainer.accumulate_grad_batches=2", "model.drop_rate=0.1",
            "trainer.max_steps=10", "trainer.eval_every_steps=4")
    loader = fit(tiny_cfg(tmp_path / "loader", *args))

    def no_dataloader(*args, **kwargs):
        raise AssertionError("data.on_device=true built a DataLoader")
    monkeypatch.setattr("pixelformer.data.DataLoader", no_dataloader)  # training and evaluation both bypass it
    on_device = fit(tiny_cfg(tmp_path / "on_device", *args, "data.on_device=true"))
    assert on_device == loader
    assert_same_weights(tmp_path / "loader", tmp_path / "on_device")
    assert read_checkpoint(tmp_path / "on_device" / "checkpoints" / "last.ckpt")["config"]["data"]["on_device"] is True


def test_on_device_eval_loaders_give_the_same_batches(tmp_path):
    # The training split for evaluation (MAE's k-NN bank) and the test split, on a CPU Fabric.
    from lightning.fabric import Fabric
    from pixelformer.data import DeviceTensorLoader, build_datasets
    from pixelformer.trainer import eval_loaders

    fabric = Fabric(accelerator="cpu", devices=1)
    cfgs = [tiny_cfg(tmp_path, "data.limit_train=100", "data.batch_size=16", f"data.on_device={on}")
            for on in ("false", "true")]
    train_set, test_set, _ = build_datasets(cfgs[0].data)
    loaders, on_device = (eval_loaders(fabric, cfg, train_set, test_set) for cfg in cfgs)
    assert all(isinstance(loader, DeviceTensorLoader) for loader in on_device.values())
    for name in ("test", "train"):
        expected, got = list(loaders[name]), list(on_device[name])
        assert len(got) == len(expected) == len(on_device[name])
        for (x, y), (dx, dy) in zip(expected, got):
            assert torch.equal(x, dx) and torch.equal(y, dy)


def test_existing_run_dir_needs_resume(run_dir):
    fit(tiny_cfg(run_dir, "trainer.max_steps=2"))
    with pytest.raises(UserError, match="resume=auto"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=2"))


def test_resume_into_another_architecture_names_the_mismatch(run_dir):
    # A changed architecture is refused from the configs, before any weights are loaded (tests/test_resume_safety.py)
    fit(tiny_cfg(run_dir, "trainer.max_steps=2"))
    with pytest.raises(UserError) as info:
        fit(tiny_cfg(run_dir, "trainer.max_steps=4", "resume=auto", "model.embed_dim=64"))
    message = str(info.value)
    assert "last.ckpt with a changed model.embed_dim (32 -> 64)" in message


def poison_loss(monkeypatch, is_bad, value: float) -> None:
    """Multiply the training loss of the n-th forward call by ``value`` (nan/inf) whenever ``is_bad(n)``."""
    original = pixelformer.tasks.cls.Classifier.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        out = original(self, batch)
        if self.training:
            calls["n"] += 1
            if is_bad(calls["n"]):
                out["loss"] = out["loss"] * value
        return out
    monkeypatch.setattr(pixelformer.tasks.cls.Classifier, "forward", poisoned)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(run_dir, monkeypatch):
    poison_loss(monkeypatch, lambda n: n > 6, float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 7") as info:
        fit(tiny_cfg(run_dir, "trainer.max_steps=20", "trainer.ckpt_every_steps=5"))
    assert "last.ckpt" in str(info.value)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["progress"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_unreadable_checkpoints_are_named(tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        read_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"x": UserError("code, not data")}, foreign)
    with pytest.raises(CheckpointError, match="foreign.ckpt"):
        read_checkpoint(foreign)


@pytest.mark.slow
def test_eval_tool_rebuilds_the_model_from_the_checkpoint(run_dir):
    metrics = fit(tiny_cfg(run_dir, "trainer.max_epochs=2", "model.pos_embed=learned"))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    out = run_tool("eval", f"ckpt={ckpt}", "trainer.progress_bar=false")
    assert out.returncode == 0, out.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metrics"]["test/acc1"] == pytest.approx(metrics["test/acc1"])
    # another resolution: the learned position embedding is resized on load (in-process: the program's main())
    from pixelformer.cli import eval as eval_cli

    assert eval_cli.main([f"ckpt={ckpt}", "data.img_size=16", f"out={run_dir / 'eval16.json'}"]) in (0, None)
    assert json.loads((run_dir / "eval16.json").read_text())["img_size"] == 16
    with pytest.raises(UserError, match="does not exist"):
        eval_cli.main([f"ckpt={run_dir / 'nope.ckpt'}"])


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    out = run_tool("train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=6",
                   "trainer.precision=32-true", "trainer.progress_bar=false", "logger=disabled", "model.depth=1",
                   "model.embed_dim=32", "model.num_heads=2", "data.batch_size=16", "trainer.eval_every_steps=3",
                   f"run.dir={tmp_path / 'ddp'}", timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "devices=2" in out.stdout
    report = json.loads((tmp_path / "ddp" / "eval.json").read_text())
    assert report["step"] == 6 and report["metrics"]["test/acc1"] > 0
    assert read_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt")["progress"]["step"] == 6


def test_a_bounded_number_of_non_finite_steps_can_be_skipped(run_dir, monkeypatch):
    poison_loss(monkeypatch, lambda n: n in (4, 9), float("inf"))
    fit(tiny_cfg(run_dir, "trainer.max_steps=12", "trainer.skip_nonfinite_steps=2"))
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["progress"]["step"] == 12 and ckpt["progress"]["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_same_seed_same_metrics(tmp_path):
    args = ("trainer.max_steps=15", "data.augment=crop_flip", "model.drop_rate=0.1", "run.seed=3")
    assert fit(tiny_cfg(tmp_path / "a", *args)) == fit(tiny_cfg(tmp_path / "b", *args))
    assert read_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt")["config"]["run"]["seed"] == 3


def test_image_size_the_patches_cannot_tile_is_refused_early(run_dir):
    with pytest.raises(UserError, match="img_size 8 is not divisible by patch_size 3"):
        fit(tiny_cfg(run_dir, "model=vit_mini", "model.patch_size=3"))


def test_unwritable_run_dir_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="cannot write to run directory"):
        fit(tiny_cfg(blocker / "run", "trainer.max_steps=1"))


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoint_resumes_eagerly(tmp_path):
    # trainer.compile wraps the task module in torch.compile; checkpoints must still hold plain parameter names.
    common = ["trainer.max_steps=4", "trainer.eval_every_steps=4", "data.limit_train=128", "data.batch_size=32"]
    fit(tiny_cfg(tmp_path / "compiled", *common, "trainer.compile=true"))
    fit(tiny_cfg(tmp_path / "eager", *common))
    compiled = read_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.ckpt")["model"]
    eager = read_checkpoint(tmp_path / "eager" / "checkpoints" / "last.ckpt")["model"]
    assert compiled.keys() == eager.keys() and not any("_orig_mod" in k for k in compiled)
    for key in eager:  # inductor fuses and reorders float math: equal to rounding, not bit for bit
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
    fit(tiny_cfg(tmp_path / "compiled", *common, "trainer.max_steps=6", "resume=auto"))
    assert read_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.ckpt")["progress"]["step"] == 6
