"""trainer.strategy=fsdp: one FSDP unit per block, two processes on the CPU with gloo (pixelformer/distributed.py).

The 2-process runs use a test split of 33 images in batches of 16: the processes get 17 and 16 images, so without
EqualBatches the second would run one forward fewer and the first would wait for ever in an all-gather.
"""
import json
import re

import pytest
import torch

import pixelformer.tasks.cls  # noqa: F401  (registers the tasks the unit tests build)
import pixelformer.tasks.dit  # noqa: F401
import pixelformer.tasks.mae  # noqa: F401
from pixelformer import UserError
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import compose
from pixelformer.data import build_datasets, build_loader
from pixelformer.distributed import EqualBatches, block_types
from pixelformer.engine import build_fabric, evaluate_checkpoint, resolve_precision
from pixelformer.saved import load_run
from pixelformer.task import get_task
from conftest import QUIET, TINY_MODEL, run_tool

FSDP = ("trainer=ddp", "trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", "trainer.progress_bar=false", "logger=disabled", "model.depth=2",
        "model.embed_dim=32", "model.num_heads=2", "data.batch_size=16", "data.eval_batch_size=16",
        "data.limit_train=97", "data.limit_test=33", "trainer.max_steps=4", "trainer.eval_every_steps=2")


def train(run_dir, *args):
    out = run_tool("train", *FSDP, *args, f"run.dir={run_dir}", timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def units(out, blocks: int, names: str) -> None:
    """The strategy's start line: one unit per block plus the root, and process 0 holds about half the values."""
    found = re.search(r"FSDP: (\d+) units \((\d+) blocks of ([\w, ]+), and one for the rest\) over 2 processes; "
                      r"process 0 holds (\d+) of the (\d+) parameter values", out.stdout)
    assert found, out.stdout[-2000:]
    assert int(found[1]) == blocks + 1 and int(found[2]) == blocks and found[3] == names
    held, total = int(found[4]), int(found[5])
    assert total / 2 - 64 <= held <= total / 2 + 64  # each unit's flat parameter is split in two (plus padding)


def full_shapes(run_dir):
    """The checkpoint's model entry has the keys and shapes of the module built on one process."""
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    cfg, info, task, module = load_run(run_dir)
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in module.state_dict().items()}
    return ckpt


def same_as_one_process(run_dir, keys):
    """The 2-process FSDP evaluation scores every test image once: one process, same checkpoint, same metrics."""
    two = json.loads((run_dir / "eval.json").read_text())["metrics"]
    one, _, _ = evaluate_checkpoint(run_dir, [])
    for key in keys:
        assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-6), key


def resume(run_dir, steps: int) -> None:
    out = run_tool("train", f"run.dir={run_dir}", "resume=auto", f"trainer.max_steps={steps}", timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'last.ckpt'} at step 4" in out.stdout
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["progress"]["step"] == steps


# ------------------------------------------------------------------------------------------------ unit tests
def test_block_types_are_found_in_every_model():
    info = build_datasets(compose(["data.limit_train=8", "data.limit_test=8"]).data)[2]
    for task, expected in (("cls", {"Block"}), ("mae", {"Block"}), ("dit", {"Block"})):  # DiT conditions the backbone's own blocks
        cfg = compose([*QUIET, *TINY_MODEL, f"task={task}"])
        module = get_task(task).build_module(cfg, info)
        assert {t.__name__ for t in block_types(module)} == expected, task
    cfg = compose([*QUIET, *TINY_MODEL, "task=mae", "task.decoder_dim=32"])
    mae = get_task("mae").build_module(cfg, info)
    # the encoder's blocks and the decoder's (decoder_blocks) are both found, as blocks of the same class
    assert type(mae.model.decoder_blocks[0]) in block_types(mae) and type(mae.model.encoder.blocks[0]) in \
        block_types(mae)


@pytest.mark.parametrize("size, batch", [(33, 16), (32, 16), (34, 16), (35, 2), (5, 4), (3, 2)])
def test_equal_batches_give_every_process_as_many_batches_and_every_image_once(size, batch):
    dataset = build_datasets(compose([f"data.limit_test={size}", "data.limit_train=8"]).data)[1]
    loaders = [EqualBatches(build_loader(dataset, batch, False, 0, rank, 2, 0), size, batch, rank, 2, "test")
               for rank in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == len(loaders[1])
    assert all(len(b[0]) > 0 for shard in batches for b in shard)
    assert sorted(i for loader in loaders for _, i in loader.sampler) == list(range(size))  # each image once
    for loader, shard in zip(loaders, batches):  # in the sampler's order (what seeded_batches pairs keys with)
        assert torch.equal(torch.cat([b[1] for b in shard]),
                           torch.tensor([int(dataset[i][1]) for _, i in loader.sampler]))


def test_equal_batches_refuse_what_cannot_be_split():
    dataset = build_datasets(compose(["data.limit_test=33", "data.limit_train=8"]).data)[1]
    with pytest.raises(UserError, match=r"data\.eval_batch_size=1: set data\.eval_batch_size to 2 or more"):
        EqualBatches(build_loader(dataset, 1, False, 0, 1, 2, 0), 33, 1, 1, 2, "test")
    one = build_datasets(compose(["data.limit_test=1", "data.limit_train=8"]).data)[1]
    with pytest.raises(UserError, match="split's 1 images cannot be dealt"):
        EqualBatches(build_loader(one, 4, False, 0, 1, 2, 0), 1, 4, 1, 2, "test")


def test_fsdp_on_the_cpu_runs_in_full_precision():
    cfg = compose([*QUIET, "trainer.strategy=fsdp", "trainer.devices=2", "trainer.precision=bf16-mixed"])
    with pytest.raises(UserError, match="trainer.precision=bf16-mixed: set trainer.precision=32-true"):
        build_fabric(cfg)
    cfg = compose([*QUIET, "trainer.strategy=fsdp", "trainer.devices=2", "model=pit_small"])
    assert cfg.trainer.precision == "auto" and resolve_precision(cfg) == "32-true"


# ------------------------------------------------------------------------------------- two processes (gloo)
@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fsdp") / "cls"
    return run_dir, train(run_dir, "task=cls")


@pytest.mark.slow
def test_fsdp_classifier_trains_evaluates_saves_and_resumes(cls_run):
    run_dir, out = cls_run
    units(out, 2, "Block")
    ckpt = full_shapes(run_dir)
    assert ckpt["progress"]["step"] == 4 and ckpt["config"]["trainer"]["strategy"] == "fsdp"
    report = json.loads((run_dir / "eval.json").read_text())
    assert sum(map(sum, report["details"]["confusion_matrix"])) == 33  # each test image counted once
    assert (run_dir / "confusion_matrix.png").exists()
    same_as_one_process(run_dir, ("test/loss", "test/acc1", "test/acc5"))
    tool = run_tool("eval", f"ckpt={run_dir}", f"out={run_dir / 'again.json'}", "trainer.progress_bar=false")
    assert tool.returncode == 0, tool.stderr[-3000:]
    assert json.loads((run_dir / "again.json").read_text())["metrics"]["test/acc1"] == \
        pytest.approx(report["metrics"]["test/acc1"])
    resume(run_dir, 6)


@pytest.mark.slow
def test_fsdp_resume_names_what_differs_in_a_checkpoint_of_another_architecture(tmp_path, cls_run):
    source, _ = cls_run
    ckpt = read_checkpoint(source / "checkpoints" / "last.ckpt")
    ckpt["model"]["backbone.extra.weight"] = torch.zeros(3)
    del ckpt["model"]["backbone.blocks.1.mlp.fc2.bias"]
    run_dir = tmp_path / "tampered"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, run_dir / "checkpoints" / "last.ckpt")
    out = run_tool("train", f"run.dir={run_dir}", "resume=auto", "trainer.max_steps=8", timeout=400)
    assert out.returncode != 0
    assert "backbone.blocks.1.mlp.fc2.bias" in out.stderr and "backbone.extra.weight" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_fsdp_mae_knn_and_pictures(tmp_path):
    run_dir = tmp_path / "mae"
    out = train(run_dir, "task=mae", "task.decoder_dim=32", "task.decoder_depth=1")
    units(out, 3, "Block")  # 2 encoder blocks and 1 decoder block
    full_shapes(run_dir)
    assert (run_dir / "reconstructions.png").exists()
    same_as_one_process(run_dir, ("test/recon_loss", "test/knn_acc", "test/knn_acc_random_init"))
    resume(run_dir, 6)


@pytest.mark.slow
def test_fsdp_dit_ema_sampling_and_fid(tmp_path, cls_run):
    # ema_decay=0: the EMA equals the weights of the last step, so a full-shaped, correctly ordered average shows as
    # equality with the model's denoiser entries.
    classifier = cls_run[0] / "checkpoints" / "last.ckpt"  # an FSDP checkpoint, loaded on one process
    run_dir = tmp_path / "dit"
    out = train(run_dir, "task=dit", "task.ema_decay=0", "task.sample_steps=3", "task.samples_per_class=1",
                "task.num_eval_samples=20", f"task.classifier_ckpt={classifier}")
    units(out, 2, "Block")
    ckpt = full_shapes(run_dir)
    denoiser = {k[len("denoiser."):]: v for k, v in ckpt["model"].items() if k.startswith("denoiser.")}
    assert denoiser.keys() == ckpt["ema"].keys()
    assert all(torch.equal(denoiser[k], ckpt["ema"][k]) for k in denoiser)
    _, _, _, module = load_run(run_dir, weights="ema")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in module.denoiser.state_dict().items())
    assert (run_dir / "samples.png").exists()
    same_as_one_process(run_dir, ("test/loss", "test/fid", "test/sample_acc", "test/fid_untrained"))
    sampled = run_tool("sample", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "num_samples=10", "steps=3",
                       "device=cpu", f"out={tmp_path / 'samples'}")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / "samples" / "samples.npz").exists()
    resume(run_dir, 6)
