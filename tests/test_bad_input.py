"""The catalogue of user mistakes in docs/bad-input.md: each one fails early with a message naming the problem and
the fix (a UserError, printed without a traceback by the tools)."""
import importlib.util
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelformer import UserError
from pixelformer.cli import eval as eval_cli
from pixelformer.cli import sample as sample_cli
from pixelformer.config import check_accumulation, compose
from pixelformer.engine import fit
from conftest import QUIET, REPO, TINY_MODEL, run_tool, tiny_cfg, write_fake_cifar


def reference_checkpoint_3ch(path):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    vit = TimmViT(img_size=8, patch_size=1, in_chans=3, num_classes=0, embed_dim=32, depth=1, num_heads=2)
    torch.save({"model": vit.state_dict()}, path)


def image_folder(root, classes=("a", "b"), per_class=2):
    """root/{train,val}/<class>/<i>.png, small solid images."""
    from PIL import Image
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (10, 10), (60 * c, 20 * i, 90)).save(root / split / name / f"{i}.png")
    return root


def corrupt_image_folder(root):
    image_folder(root)
    (root / "train" / "b" / "broken.png").write_bytes(b"not an image at all")


def rewrite_cifar_batch(path, **changes):
    entry = pickle.loads(path.read_bytes())
    entry.update(changes)
    path.write_bytes(pickle.dumps(entry))


def cifar_wrong_shape(root):
    folder = write_fake_cifar(root / "cifar", 10)
    rewrite_cifar_batch(folder / "data_batch_2", data=np.zeros((8, 1024), np.uint8))


def cifar_labels_out_of_range(root):
    folder = write_fake_cifar(root / "cifar", 100)
    rewrite_cifar_batch(folder / "train", fine_labels=[100] + [0] * 39)


def cifar_label_count(root):
    folder = write_fake_cifar(root / "cifar", 10)
    rewrite_cifar_batch(folder / "test_batch", labels=[1, 2, 3])


class RunsCode:
    """Pickles as a call of os.system, which unpickling would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def cifar_with_code(root):
    folder = write_fake_cifar(root / "cifar", 10)
    rewrite_cifar_batch(folder / "data_batch_1", labels=RunsCode(root / "ran"))


def float_image_folder(root):
    """An image folder holding a float TIFF whose values are not intensities in [0, 1]."""
    from PIL import Image
    image_folder(root)
    Image.fromarray(np.linspace(0, 7, 100, dtype=np.float32).reshape(10, 10)).save(root / "train" / "b" / "f.tif")


# Files that a catalogue case needs in its temporary directory, by mistake.
SETUP = {
    "float image outside [0, 1]": lambda tmp: float_image_folder(tmp / "float"),
    "one-class image folder": lambda tmp: image_folder(tmp / "oneclass", classes=("only",)),
    "class folder without images": lambda tmp: (image_folder(tmp / "noimages"),
                                                [f.unlink() for f in (tmp / "noimages" / "val" / "b").iterdir()]),
    "corrupt file in an image folder": lambda tmp: corrupt_image_folder(tmp / "corrupt"),
    "CIFAR images of the wrong shape": cifar_wrong_shape,
    "CIFAR labels out of range": cifar_labels_out_of_range,
    "CIFAR labels and images of different lengths": cifar_label_count,
    "CIFAR file that would run code": cifar_with_code,
}


CATALOGUE = [
    # (mistake, arguments, what the message must say)
    ("misspelt config key", ["optim.lrr=1"], "Key 'lrr' not in 'OptimCfg'. Did you mean: 'lr'?"),
    ("wrong value type", ["optim.lr=fast"], "could not be converted to Float"),
    ("value outside a choice", ["model.pos_embed=rope"], "expected one of ['sincos', 'learned', 'none']"),
    ("unknown model", ["model=pit_tinny"], "unknown model 'pit_tinny'. Did you mean: pit_tiny"),
    ("unknown dataset", ["data=cifar1000"], "unknown data 'cifar1000'"),
    ("unknown task", ["task=clss"], "unknown task 'clss'. Did you mean: cls"),
    ("argument without '='", ["lr"], "cannot parse argument 'lr'"),
    ("batch size 0", ["data.batch_size=0"], "data.batch_size must be positive"),
    ("negative step budget", ["trainer.max_steps=-1"], "trainer.max_steps must be positive"),
    ("data on the device with augmentation", ["data.on_device=true", "data.augment=crop_flip"],
     "set data.augment=none or data.on_device=false"),
    ("image folder on the device", ["data=imagefolder", "data.root={tmp}", "data.img_size=8", "data.on_device=true"],
     "imagefolder decodes files as it goes"),
    ("image size not divisible by the patch size", ["model=vit_mini", "model.patch_size=3"],
     "img_size 8 is not divisible by patch_size 3"),
    ("patch size on a pixel model", ["model=pit_tiny", "model.patch_size=2"], "use vit_tiny for patches"),
    ("missing data root", ["data=cifar100", "data.root=/nonexistent/cifar"], "add data.download=true"),
    ("data root not set", ["data=cifar10", "data.root=null"], "data.root is not set"),
    ("empty image folder", ["data=imagefolder", "data.root={tmp}", "data.img_size=8"], "must contain train/"),
    ("imagefolder without a size", ["data=imagefolder", "data.root={tmp}"], "data.img_size is required"),
    ("wrong channel count in init_from", ["init_from={tmp}/rgb.pth"], "patch_embed.proj.weight: checkpoint (32, 3, 1, 1)"),
    ("init_from a missing file", ["init_from={tmp}/nope.ckpt"], "does not exist"),
    ("unwritable run dir", ["run.dir={tmp}/file/run"], "cannot write to run directory"),
    ("mask ratio of 1", ["task=mae", "task.mask_ratio=1.0"], "task.mask_ratio must be in [0, 1)"),
    ("norm_pix_loss on 1-channel pixels", ["task=mae", "task.norm_pix_loss=true"], "single value"),
    ("FID classifier checkpoint missing", ["task=dit", "task.classifier_ckpt={tmp}/none.ckpt"], "not found"),
    ("positions switched off for DiT", ["task=dit", "model.pos_embed=none"], "needs positions"),
    ("depth 0", ["model.depth=0"], "model.depth must be positive (or null for the model's default), got 0"),
    ("MLP ratio 0", ["model.mlp_ratio=0"], "model.mlp_ratio must be positive"),
    ("zero attention heads", ["model.num_heads=0"], "model.num_heads must be positive"),
    ("negative width", ["model.embed_dim=-32"], "model.embed_dim must be positive"),
    ("patch size 0", ["model=vit_mini", "model.patch_size=0"], "model.patch_size must be positive"),
    ("dropout of 1", ["model.drop_rate=1.0"], "model.drop_rate must be in [0, 1)"),
    ("attention dropout above 1", ["model.attn_drop_rate=1.5"], "model.attn_drop_rate must be in [0, 1)"),
    ("negative drop path", ["model.drop_path_rate=-0.1"], "model.drop_path_rate must be in [0, 1)"),
    ("negative gradient clip", ["trainer.grad_clip=-1"], "trainer.grad_clip must be a positive max gradient norm"),
    ("gradient clip 0", ["trainer.grad_clip=0"], "(null turns clipping off), got 0.0"),
    ("log every 0 steps", ["trainer.log_every_steps=0"], "trainer.log_every_steps must be positive"),
    ("limit_train 0", ["data.limit_train=0"], "data.limit_train must be a positive number of images"),
    ("negative limit_test", ["data.limit_test=-5"], "data.limit_test must be a positive number of images"),
    ("negative weight decay", ["optim.weight_decay=-0.05"], "optim.weight_decay must be >= 0"),
    ("negative warmup steps", ["optim.warmup_steps=-1"], "optim.warmup_steps must be >= 0"),
    ("negative warmup epochs", ["optim.warmup_epochs=-1"], "optim.warmup_epochs must be >= 0"),
    ("min_lr above lr", ["optim.lr=1e-4", "optim.min_lr=1e-3"], "optim.min_lr must be in [0, optim.lr=0.0001]"),
    ("negative min_lr", ["optim.min_lr=-1e-6"], "optim.min_lr must be in [0, optim.lr="),
    ("learning rate NaN", ["optim.lr=nan"], "optim.lr must be a positive, finite number, got nan"),
    ("learning rate inf", ["optim.lr=inf"], "optim.lr must be a positive, finite number, got inf"),
    ("Adam beta of 1", ["optim.betas=[0.9,1.0]"], "optim.betas must both be in [0, 1)"),
    ("SGD momentum of 1", ["optim.name=sgd", "optim.momentum=1.0"], "optim.momentum must be in [0, 1)"),
    ("negative seed", ["run.seed=-1"], "run.seed must be in [0, 2**32 - 1]"),
    ("negative loader workers", ["data.num_workers=-1"], "data.num_workers must be >= 0"),
    ("unsupported accelerator", ["trainer.accelerator=tpu"], "expected one of ['cpu', 'gpu', 'cuda', 'mps', 'auto']"),
    ("crop scale 0", ["data.augment=rrc_flip", "data.rrc_scale_min=0"], "data.rrc_scale_min must be in (0, 1]"),
    ("one-class image folder", ["data=imagefolder", "data.root={tmp}/oneclass", "data.img_size=8"],
     "train/ has 1 class folder (only); put the images in at least 2 class sub-folders"),
    ("class folder without images", ["data=imagefolder", "data.root={tmp}/noimages", "data.img_size=8"],
     "Found no valid file for the classes b"),
    ("corrupt file in an image folder", ["data=imagefolder", "data.root={tmp}/corrupt", "data.img_size=8"],
     "1 of 5 files are not readable images: {tmp}/corrupt/train/b/broken.png; remove or replace them"),
    ("CIFAR images of the wrong shape", ["data=cifar10", "data.root={tmp}/cifar"],
     "data_batch_2: 'data' must be an N x 3072 uint8 array (32x32x3 images), found uint8 array of shape (8, 1024)"),
    ("CIFAR labels out of range", ["data=cifar100", "data.root={tmp}/cifar"],
     "'fine_labels' holds labels from 0 to 100, outside [0, 100)"),
    ("CIFAR labels and images of different lengths", ["data=cifar10", "data.root={tmp}/cifar"],
     "test_batch: 'labels' must be a list of 20 integer labels"),
    ("CIFAR file that would run code", ["data=cifar10", "data.root={tmp}/cifar"],
     "data_batch_1: its pickle calls posix.system"),
    ("image size beyond the machine's memory", ["data.img_size=100000"],
     "data.img_size=100000 resizes the 1,797 digits images (8x8 native) to 100000x100000"),
    ("model too big for the machine's memory",
     ["model=pit_huge", "model.depth=null", "model.embed_dim=null", "model.num_heads=null", "data.img_size=128"],
     "M parameters) on 128x128 images (16,385 tokens) at data.batch_size=64 in 32-true needs about"),
    ("gradient accumulation longer than an epoch", ["data.batch_size=128", "trainer.accumulate_grad_batches=20"],
     "trainer.accumulate_grad_batches=20 is more than the 11 batches of an epoch"),
    ("resume from a missing file", ["resume={tmp}/nope.ckpt"], "resume={tmp}/nope.ckpt: no such checkpoint file"),
    ("interpolation of itself", ["optim.lr=${optim.lr}"],
     "config error: cannot resolve optim.lr=${optim.lr} (Recursive interpolation detected): a ${...} must name"),
    ("interpolation of an unset variable", ["run.dir=${oc.env:PIXELFORMER_NO_SUCH_VAR}/a"],
     "cannot resolve run.dir=${oc.env:PIXELFORMER_NO_SUCH_VAR}/a (KeyError raised while resolving interpolation: "
     "\"Environment variable 'PIXELFORMER_NO_SUCH_VAR' not found\")"),
    ("interpolation of a missing key", ["optim.lr=${no.such.key}"],
     "cannot resolve optim.lr=${no.such.key} (Interpolation key 'no.such.key' not found)"),
    ("a group choice given as a path", ["data=../task/cls"], "unknown data '../task/cls'. Choices: cifar10"),
    ("subset seed outside its range", ["data.train_subset=100", "data.subset_seed=-1"],
     "data.subset_seed must be in [0, 2**32 - 1] (the seed of scikit-learn's stratified split), got -1"),
    ("float image outside [0, 1]", ["data=imagefolder", "data.root={tmp}/float", "data.img_size=8"],
     "imagefolder {tmp}/float/train: cannot use image {tmp}/float/train/b/f.tif: a float image is read as "
     "intensities in [0, 1], but its values run from 0 to 7: rescale it to [0, 1] or save it as an 8-bit image"),
    ("resume from a file that is not a training checkpoint", ["resume={tmp}/rgb.pth"],
     "{tmp}/rgb.pth is not a pixelformer training checkpoint (format None), so a run cannot be resumed from it"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mistake,args,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_catalogue(mistake, args, needle, tmp_path):
    (tmp_path / "file").write_text("a file, not a directory")
    reference_checkpoint_3ch(tmp_path / "rgb.pth")
    if mistake in SETUP:
        SETUP[mistake](tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    needle = needle.replace("{tmp}", str(tmp_path))
    with pytest.raises(UserError) as info:
        if not any(a.startswith("run.dir=") for a in args):
            args.append(f"run.dir={tmp_path / 'run'}")
        fit(tiny_cfg(tmp_path / "unused", "trainer.max_steps=1", *args))
    assert needle in str(info.value), str(info.value)


def test_existing_run_and_corrupt_resume(tmp_path):
    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=1"))
    with pytest.raises(UserError, match="already holds a run .* pass resume=auto"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=1"))
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cannot read checkpoint .*last.ckpt"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=2", "resume=auto"))


def test_external_launcher_needs_a_shared_run_dir(tmp_path, monkeypatch):
    # torchrun sets WORLD_SIZE in every process it starts; each would otherwise stamp its own default run.dir.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("PIXELFORMER_RUN_DIR", raising=False)
    cfg = tiny_cfg(tmp_path / "unused", "trainer.max_steps=1")
    cfg.run.dir = None
    with pytest.raises(UserError, match="set run.dir=<shared path>"):
        fit(cfg)


@pytest.mark.slow
def test_tools_print_the_message_without_a_traceback(tmp_path):
    # Every program goes through the same wrapper (pixelformer.cli.run_main): one is run as a user runs it, the
    # others' main() in-process raise the UserError that the wrapper prints as that one line.
    train = ["data=cifar100", "data.root=/nonexistent", f"run.dir={tmp_path / 'run'}"]  # never a runs/ in the checkout
    out = run_tool("train", *train)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr, out.stderr[-2000:]
    for main in (eval_cli.main, sample_cli.main):
        with pytest.raises(UserError, match="^checkpoint /nonexistent.ckpt does not exist: check the path"):
            main(["ckpt=/nonexistent.ckpt"])
    assert compose(["data.batch_size=3"]).data.batch_size == 3


# ------------------------------------------------------------------------------------------------ memory check
@pytest.mark.slow
def test_too_big_a_model_is_refused_quickly_with_the_estimate(tmp_path, monkeypatch):
    from pixelformer import runtime
    from pixelformer.data import DataInfo

    monkeypatch.setattr(runtime, "available_memory", lambda device: 16 * 2 ** 30)  # the same on every machine
    cfg = tiny_cfg(tmp_path / "run", "model=pit_huge", "model.depth=null", "model.embed_dim=null",
                   "model.num_heads=null", "data.img_size=32", "trainer.max_steps=1")
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        fit(cfg)
    assert time.perf_counter() - start < 30  # it took 4 minutes to die of memory before
    estimate = runtime.estimate_training_memory(cfg, DataInfo("digits", 10, 1, 32, (0.5,), (0.25,)))
    # 632 M parameters x (weight + 2 AdamW moments) x 4 bytes, and as much again for the gradients
    assert estimate.params == sum(p.numel() for p in _meta_pit_huge(32).parameters())
    assert estimate.weights == estimate.params * 12 and estimate.gradients == estimate.params * 4
    message = str(info.value)
    assert f"needs about {runtime.format_bytes(estimate.total)}" in message and "but cpu has 16.0 GiB" in message
    assert "trainer.memory_check=false skips this check" in message and "\n" not in message
    # the same run with the check switched off is not refused by it (checked without building the huge model)
    cfg.trainer.memory_check = False
    assert runtime.check_fits_memory(cfg, DataInfo("digits", 10, 1, 32, (0.5,), (0.25,)), torch.device("cpu")) \
        is None


def _meta_pit_huge(img_size):
    from pixelformer.models import create_backbone
    with torch.device("meta"):
        return create_backbone("pit_huge", img_size=img_size, in_chans=1, num_classes=10)


def test_the_default_run_passes_the_memory_check(tmp_path):
    from pixelformer.data import build_datasets
    from pixelformer.runtime import available_memory, check_fits_memory

    cfg = compose(["trainer.accelerator=cpu", "trainer.precision=32-true"])  # pit_mini on digits, batch 64
    info = build_datasets(cfg.data)[2]
    estimate = check_fits_memory(cfg, info, torch.device("cpu"))
    assert estimate is not None and estimate.total < 256 * 2 ** 20 < available_memory(torch.device("cpu"))


def test_activation_estimate_matches_the_measured_pit_tiny_figure():
    # docs/performance.md "Memory and tokens": a PiT-Tiny training step measured 149 KB of activations per token in fp32, ~86 KB
    # in bf16-mixed (the estimate takes 2 bytes, a lower bound); checkpointing measured 2.7-3.2x less.
    from pixelformer.data import DataInfo
    from pixelformer.runtime import estimate_training_memory

    info = DataInfo("x", 10, 3, 32, (0.5,) * 3, (0.25,) * 3)
    per_token = {}
    for name, extra in (("fp32", []), ("bf16", ["trainer.precision=bf16-mixed"]),
                        ("ckpt", ["trainer.grad_checkpointing=true"])):
        cfg = compose(["model=pit_tiny", "data.batch_size=1", "trainer.precision=32-true", *extra])
        estimate = estimate_training_memory(cfg, info)
        assert estimate.tokens == 32 * 32 + 1
        per_token[name] = estimate.activations / estimate.tokens
    assert per_token["fp32"] == pytest.approx(149e3, rel=0.02)
    assert 0.5 * 86e3 < per_token["bf16"] <= 86e3
    assert per_token["ckpt"] < per_token["fp32"] / 2.7
    # attention dropout forces the math kernel, whose N x N matrices make memory quadratic in tokens
    cfg = compose(["model=pit_tiny", "data.batch_size=1", "trainer.precision=32-true", "model.attn_drop_rate=0.1"])
    assert estimate_training_memory(cfg, info).activations > 1.5 * per_token["fp32"] * 1025


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.slow
def test_memory_estimate_is_a_lower_bound_of_a_measured_step(device, monkeypatch):
    # One training step of PiT-Tiny (257 tokens, batch 4), measured like benchmarks/throughput.py does: the state
    # that lives across steps plus the step's peak of live tensor bytes. The estimate must stay close to it and not
    # above it (measured on CPU: 0.98x fp32, 0.86x with checkpointing, 0.86x bf16-mixed), so that the check refuses
    # only runs that cannot fit.
    spec = importlib.util.spec_from_file_location("pixelformer_bench_throughput", REPO / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    from pixelformer.data import DataInfo
    from pixelformer.models import create_backbone
    from pixelformer.runtime import estimate_training_memory

    info = DataInfo("x", 10, 3, 16, (0.5,) * 3, (0.25,) * 3)
    for precision, checkpointing in (("32-true", False), ("32-true", True), ("bf16-mixed", False)):
        cfg = compose(["model=pit_tiny", "data.batch_size=4", f"trainer.precision={precision}",
                       f"trainer.grad_checkpointing={str(checkpointing).lower()}"])
        estimate = estimate_training_memory(cfg, info)
        torch.manual_seed(0)
        model = create_backbone("pit_tiny", img_size=16, in_chans=3, num_classes=10).to(device)
        model.set_grad_checkpointing(checkpointing)
        step = bench.TrainStep(model, 4, 16, "fp32" if precision == "32-true" else precision, torch.device(device),
                               in_chans=3, num_classes=10)
        step()  # the optimizer's moments exist from the first step on
        measured = step.static_bytes() + bench.transient_peak_bytes(step, torch.device(device))
        assert 0.4 * measured < estimate.total < 1.1 * measured, (precision, checkpointing, estimate, measured)


def test_accumulation_longer_than_an_epoch_is_refused():
    # digits: 1,437 training images, batch 128 -> 11 full batches per epoch; the loop steps at each epoch's end,
    # so accumulating 20 would sum 11 micro-batches divided by 20 (a silently smaller learning rate).
    cfg = compose(["data.batch_size=128", "trainer.accumulate_grad_batches=20"])
    with pytest.raises(UserError, match=r"trainer.accumulate_grad_batches=20 is more than the 11 batches of an epoch "
                                        r"\(1437 training images, data.batch_size=128 per process\): set it to at "
                                        r"most 11"):
        check_accumulation(cfg, 11, 1437)
    cfg.trainer.accumulate_grad_batches = 11
    check_accumulation(cfg, 11, 1437)


# ------------------------------------------------------------------------------------------------ data files
def test_truncated_jpeg_is_named_when_decoded(tmp_path):
    # A header check passes a JPEG cut short; decoding it then stops with the file's name, not a worker traceback.
    from PIL import Image
    from pixelformer.data import build_datasets

    image_folder(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "train" / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "data.augment=none"])
    train, _, _ = build_datasets(cfg.data)
    files = [path for path, _ in train.folder.samples]
    with pytest.raises(UserError, match=r"cannot decode image .*cut\.jpg \(OSError: image file is truncated"):
        train.load(files.index(str(tmp_path / "train" / "a" / "cut.jpg")))


# ------------------------------------------------------------------------------------------------ tools
def test_eval_out_into_a_missing_folder_is_created(tmp_path):
    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=1"))
    spec = importlib.util.spec_from_file_location("eval_tool", REPO / "tools" / "eval.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "reports" / "new" / "eval.json"
    assert tool.main([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={out}"]) == 0
    assert json.loads(out.read_text())["data"] == "digits"
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=r"out=.*file/eval.json: cannot create its folder .*file \(File exists\)"):
        tool.main([f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'file' / 'eval.json'}"])


@pytest.mark.slow
def test_a_bad_image_in_a_loader_worker_ends_the_run_without_hanging(tmp_path):
    # Loader workers ignore SIGTERM (the trainer stops them once it has saved); at interpreter exit multiprocessing
    # terminates daemonic workers with SIGTERM and then waits for them, which hung for ever after a worker's error.
    from PIL import Image

    image_folder(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    for name in ("cut1.jpg", "cut2.jpg"):
        (tmp_path / "train" / "a" / name).write_bytes(data[: len(data) // 2])
    result = run_tool("train", "data=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "data.num_workers=1",
                      "data.batch_size=2", "trainer.max_steps=4", f"run.dir={tmp_path / 'run'}", *QUIET,
                      *TINY_MODEL, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "worker process" not in result.stderr, result.stderr[-2000:]
    assert "error: cannot decode image" in result.stderr and "image file is truncated" in result.stderr


# ------------------------------------------------------------------------------- hostile inputs (docs/bad-input.md)
@pytest.mark.slow
def test_broken_interpolation_with_cfg_is_one_line():
    out = run_tool("train", "optim.lr=${optim.lr}", "--cfg")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: config error: cannot resolve optim.lr=${optim.lr}")
    assert out.stderr.count("\n") == 1


def test_16_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    # convert("RGB") clipped a 16-bit PNG to white and a [0, 1] float TIFF to black: constant images.
    from PIL import Image
    from pixelformer.data import build_datasets

    image_folder(tmp_path)
    ramp = np.linspace(0, 1, 100).reshape(10, 10)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "train" / "a" / "deep.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "train" / "a" / "float.tif")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(tmp_path / "train" / "a" / "plain.png")
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.img_size=10", "data.augment=none"])
    train, _, _ = build_datasets(cfg.data)
    names = [Path(path).name for path, _ in train.folder.samples]
    plain = train.load(names.index("plain.png"))[0]
    for name in ("deep.png", "float.tif"):
        image = train.load(names.index(name))[0]
        assert image.dtype == torch.uint8 and (image.int() - plain.int()).abs().max() <= 1, name


def test_folder_links_are_read_once(tmp_path):
    # A link back up was walked again and again (6 images counted as 246), one to another class relabelled it.
    import os
    from pixelformer.data import build_datasets

    image_folder(tmp_path, per_class=3)
    os.symlink("..", tmp_path / "train" / "a" / "up")
    os.symlink("../b", tmp_path / "train" / "a" / "b_too")
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.img_size=8"])
    with pytest.warns(UserWarning, match=r"skipped 2 folder link\(s\) that lead to a folder read already"):
        train, _, _ = build_datasets(cfg.data)
    labels = {Path(path).relative_to(tmp_path).as_posix(): label for path, label in train.folder.samples}
    assert labels == {f"train/{c}/{i}.png": int(c == "b") for c in "ab" for i in range(3)}


def test_a_non_utf8_class_name_is_drawn_and_the_run_finishes(tmp_path):
    import os
    image_folder(tmp_path, per_class=3)
    for split in ("train", "val"):
        os.rename(tmp_path / split / "b", os.fsdecode(os.fsencode(tmp_path / split) + b"/b\xff"))
    metrics = fit(tiny_cfg(tmp_path / "run", "data=imagefolder", f"data.root={tmp_path}", "data.img_size=8",
                           "data.batch_size=2", "trainer.max_steps=1"))
    assert "test/acc1" in metrics and (tmp_path / "run" / "confusion_matrix.png").is_file()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["step"] == 1


def test_a_failing_picture_warns_and_the_run_finishes(tmp_path, monkeypatch, capsys):
    from pixelformer.tasks.cls import ClassificationTask

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts\non this machine")
    monkeypatch.setattr(ClassificationTask, "visualize", broken)
    metrics = fit(tiny_cfg(tmp_path / "run", "trainer.max_steps=1"))
    assert "test/acc1" in metrics and (tmp_path / "run" / "eval.json").is_file()
    assert "warning: the cls task's pictures at step 1 failed (RuntimeError: no fonts on this machine); the run goes " \
           "on without them" in capsys.readouterr().out


def test_an_image_above_pils_bomb_limit_names_the_limit_and_the_key(tmp_path, monkeypatch):
    # PIL's DecompressionBombError used to read "not readable images", as if the file were broken.
    from PIL import Image
    from pixelformer.data import build_datasets

    image_folder(tmp_path)
    Image.new("RGB", (64, 64)).save(tmp_path / "train" / "a" / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 64x64 file stands for a 20,000 x 20,000 one
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.img_size=8"])
    with pytest.raises(UserError, match=r"1 of 5 files have more pixels than PIL opens by default \(2 x "
                                        r"Image.MAX_IMAGE_PIXELS = 2,000, a guard against decompression bombs\), e.g. "
                                        r".*big.png \(4,096 pixels\): if you trust these files, set "
                                        r"data.max_image_pixels=4096"):
        build_datasets(cfg.data)
    cfg = compose(["data=imagefolder", f"data.root={tmp_path}", "data.img_size=8", "data.max_image_pixels=4096"])
    train, _, _ = build_datasets(cfg.data)
    names = [Path(path).name for path, _ in train.folder.samples]
    assert train.load(names.index("big.png"))[0].shape == (3, 8, 8)


def test_a_full_disk_during_a_checkpoint_names_the_file_and_the_last_good_step(tmp_path, monkeypatch):
    import errno
    from lightning.fabric import Fabric

    run_dir = tmp_path / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=2", "trainer.ckpt_every_steps=1"))
    original, calls = Fabric.save, []

    def full_disk(self, path, state, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, path, state, *args, **kwargs)
    monkeypatch.setattr(Fabric, "save", full_disk)
    with pytest.raises(UserError) as info:
        fit(tiny_cfg(run_dir, "trainer.max_steps=4", "trainer.ckpt_every_steps=1", "resume=auto"))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert str(info.value) == (f"cannot write checkpoint {last} at step 4 (No space left on device): the last good "
                               f"checkpoint, {last} (step 3), is intact; free space or make {last.parent} writable, "
                               f"then resume with resume=auto")
    assert not last.with_name("last.ckpt.tmp").exists()
    assert torch.load(last, weights_only=True, map_location="cpu")["progress"]["step"] == 3


# ------------------------------------------------------------------------------------------------ run files
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=2"))
    return run_dir


def _copy_run(finished_run, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    return run_dir


@pytest.mark.slow
def test_a_non_utf8_byte_in_metrics_does_not_block_resume(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 1, "note\xff": 1}\n')
    assert "test/acc1" in fit(tiny_cfg(run_dir, "trainer.max_steps=3", "resume=auto"))
    assert b'"note\xff"' in metrics.read_bytes()  # kept as it was: it precedes the checkpoint's step


@pytest.mark.slow
@pytest.mark.parametrize("content", ["[1, 2]", '"finished"'], ids=["list", "string"])
def test_an_eval_json_that_is_not_a_report_is_evaluated_again(finished_run, tmp_path, content, capsys):
    run_dir = _copy_run(finished_run, tmp_path)
    (run_dir / "eval.json").write_text(content)
    assert "test/acc1" in fit(tiny_cfg(run_dir, "trainer.max_steps=2", "resume=auto"))
    assert "eval.json is not a run report (a JSON object with metrics and step): the final evaluation runs again" \
        in capsys.readouterr().err
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 2


def test_an_eval_json_folder_is_refused_on_resume(finished_run, tmp_path):
    run_dir = _copy_run(finished_run, tmp_path)
    (run_dir / "eval.json").unlink()
    (run_dir / "eval.json").mkdir()
    with pytest.raises(UserError, match=r"eval.json is not a file \(a directory\?\): the run writes its final report "
                                        r"there; move it out of the way, then resume=auto"):
        fit(tiny_cfg(run_dir, "trainer.max_steps=3", "resume=auto"))


@pytest.mark.slow
def test_a_hand_edited_config_yaml_is_not_ignored_silently(finished_run, tmp_path, capsys):
    from pixelformer.run import compose_for_resume

    run_dir = _copy_run(finished_run, tmp_path)
    config = run_dir / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("lr: 0.001", "lr: 0.005"))
    with pytest.raises(UserError) as info:
        fit(compose_for_resume([f"run.dir={run_dir}", "resume=auto"]))
    assert str(info.value).startswith(f"{config} was edited: optim.lr (0.005 in config.yaml, 0.001 in the run); a "
                                      f"resume runs with the config saved in ")
    assert config.read_text() != original  # the edit is still there to be reverted
    # a key that a resume may change: warned, with the argument that applies it
    config.write_text(original.replace("max_steps: 2", "max_steps: 3"))
    capsys.readouterr()
    fit(compose_for_resume([f"run.dir={run_dir}", "resume=auto"]))
    err = capsys.readouterr().err
    assert "config.yaml differs from the config this resume runs with" in err and \
        "in trainer.max_steps; config.yaml is not read on resume and is rewritten: pass trainer.max_steps=3 to " \
        "apply it" in err, err
    # the command line's own change is no edit: nothing is said
    fit(compose_for_resume([f"run.dir={run_dir}", "resume=auto", "trainer.max_steps=3"]))
    assert "differs from" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ Python API
@pytest.mark.parametrize("args", [None, [1, 2], "optim.lr=1"], ids=["None", "ints", "string"])
def test_compose_takes_a_list_of_strings(args):
    with pytest.raises(UserError, match=r"compose\(\) takes a list of 'key=value' / 'group=choice' strings"):
        compose(args)


def test_fit_of_a_dict_says_what_it_takes():
    with pytest.raises(UserError, match=r"fit\(\) takes the config that pixelformer.config.compose\(\) returns .* got "
                                        r"dict"):
        fit({"task": {"name": "cls"}})


@pytest.mark.parametrize("kwargs,message", [
    ({"img_size": -8}, "img_size must be a whole number (or a pair of them) >= 1, got -8"),
    ({"img_size": "8"}, "img_size must be a whole number (or a pair of them) >= 1, got '8'"),
    ({"img_size": 8.5}, "img_size must be a whole number (or a pair of them) >= 1, got 8.5"),
    ({"in_chans": 0}, "in_chans must be a whole number >= 1, got 0"),
], ids=["negative", "string", "float", "no channels"])
def test_create_backbone_refuses_impossible_sizes(kwargs, message):
    from pixelformer.models import create_backbone
    with pytest.raises(ValueError) as info:
        create_backbone("pit_mini", **kwargs)
    assert str(info.value) == message
    assert create_backbone("pit_mini", img_size=np.int64(8), in_chans=1).patch_embed.num_patches == 64


def test_timm_create_model_names_a_missing_checkpoint_path(tmp_path):
    import timm
    with pytest.raises(FileNotFoundError) as info:
        timm.create_model("pixelformer_pit_mini", checkpoint_path=str(tmp_path / "nope.ckpt"), img_size=8, in_chans=1)
    assert str(info.value).startswith(f"checkpoint_path={tmp_path / 'nope.ckpt'}: no such file")


def test_sampling_a_cls_checkpoint_suggests_no_option_sampling_lacks(finished_run, tmp_path):
    # It said "use weights=model", an option tools/sample.py rejects.
    from pixelformer.cli.sample import main
    last = finished_run / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError) as info:
        main([f"ckpt={last}", "device=cpu", f"out={tmp_path}"])
    assert str(info.value) == f"{last} is not a dit checkpoint (task cls): sampling needs the checkpoint of a task=dit " \
                              f"run"
