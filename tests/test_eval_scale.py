"""Correct at scale: evaluation memory bounded by the batch, a float32 EMA under bf16, guidance only where it was
trained, eval-mode pictures, and task / sampling-tool inputs refused early with one line."""
import copy
import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import pixelformer.tasks.mae
from pixelformer import UserError, create_backbone
from pixelformer.checkpoint import read_checkpoint
from pixelformer.config import compose
from pixelformer.data import DataInfo
from pixelformer.engine import fit
from pixelformer.layers.patch_embed import PatchEmbed
from pixelformer.metrics import ClassifierFeatures, build_fid
from pixelformer.task import EvalContext, get_task
from pixelformer.trainer import EMA
from pixelformer.tasks.dit import generate_chunks
from pixelformer.tasks.mae import knn_accuracy
from conftest import QUIET, REPO, TINY_MODEL, run_tool, tiny_cfg, run_process

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def fake_info(img_size: int = 8, in_chans: int = 3) -> DataInfo:
    return DataInfo("fake", 10, in_chans, img_size, MEAN[:in_chans], STD[:in_chans])


def small_cfg(*overrides: str):
    return compose([*QUIET, *TINY_MODEL, "trainer.precision=32-true", *overrides])


def image_loader(n: int, batch: int, info: DataInfo) -> DataLoader:
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, info.in_chans, info.img_size, info.img_size, generator=g)
    return DataLoader(TensorDataset(images, torch.randint(0, info.num_classes, (n,), generator=g)), batch_size=batch)


def dit_for_eval(n_test: int, num_eval_samples: int, eval_batch: int, info: DataInfo, baseline: bool = True):
    """A DiT task ready to evaluate on ``n_test`` random test images, with a random classifier for FID."""
    from lightning.fabric import Fabric

    cfg = small_cfg("task=dit", "task.sample_steps=2", f"task.num_eval_samples={num_eval_samples}",
                    f"data.eval_batch_size={eval_batch}", f"task.untrained_baseline={str(baseline).lower()}",
                    "task.classifier_ckpt=set-in-the-cache-below")
    torch.manual_seed(0)
    task = get_task("dit")
    module = task.build_module(cfg, info)
    backbone = create_backbone("pit_mini", img_size=info.img_size, in_chans=info.in_chans, depth=1, embed_dim=32,
                               num_heads=2, num_classes=info.num_classes)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    ctx = EvalContext(fabric, cfg, info, {"test": image_loader(n_test, eval_batch, info)},
                      ema=EMA(module.denoiser, cfg.task.ema_decay).module)
    ctx.cache["classifier"] = ClassifierFeatures(backbone, info.mean, info.std)
    return task, fabric.setup_module(module), ctx


class LargestPatchBatch:
    """Records the largest batch each PatchEmbed (the first layer of every network) sees, by module id."""

    def __enter__(self):
        self.seen: dict[int, int] = {}

        def hook(module, inputs, output):
            if isinstance(module, PatchEmbed):
                self.seen[id(module)] = max(self.seen.get(id(module), 0), inputs[0].shape[0])
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------- 1. bounded memory
@pytest.mark.parametrize("n", [20, 60])
def test_dit_eval_runs_every_network_on_one_eval_batch_at_a_time(n):
    info = fake_info()
    task, module, ctx = dit_for_eval(n, num_eval_samples=n, eval_batch=8, info=info)
    with LargestPatchBatch() as seen, torch.no_grad():
        metrics = task.evaluate(module, ctx)
    assert {"test/fid", "test/sample_acc", "test/fid_untrained", "test/sample_acc_untrained"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    largest = seen.seen
    # real and generated images alike, whatever the split or sample count
    assert largest.pop(id(ctx.cache["classifier"].backbone.patch_embed)) == 8
    assert largest.pop(id(module.module.denoiser.x_embedder)) == 8  # the test loss
    assert list(largest.values()) == [2 * 8, 2 * 8], largest  # EMA and untrained samplers; guidance doubles


def test_batched_real_image_statistics_equal_one_pass():
    info = fake_info()
    task, module, ctx = dit_for_eval(50, num_eval_samples=4, eval_batch=16, info=info)
    classifier, batched = task.scorers(ctx)
    images = ctx.loaders["test"].dataset.tensors[0]
    once = build_fid("classifier", classifier, None, (3, 8, 8))
    once.update((images * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)).clamp(0, 1),
                real=True)
    assert int(batched.real_features_num_samples) == 50
    assert torch.allclose(batched.real_features_sum, once.real_features_sum, rtol=1e-10)
    assert torch.allclose(batched.real_features_cov_sum, once.real_features_cov_sum, rtol=1e-10)


RSS_PROBE = """
import resource, sys, torch
sys.path[:0] = [{tests!r}, {repo!r}]
import test_eval_scale as t
info = t.fake_info(img_size=16)
for n in {sizes!r}:
    task, module, ctx = t.dit_for_eval(n, num_eval_samples=4, eval_batch=32, info=info, baseline=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        task.evaluate(module, ctx)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_dit_eval_peak_memory_does_not_grow_with_the_test_split():
    # Evaluations on 100 then 1,000 test images (16x16, 256 tokens each) in one fresh process: the second may raise
    # the peak resident memory only if evaluation holds more than a batch at once (one classifier pass over all
    # 1,000 images held about 300 MiB more).
    script = RSS_PROBE.format(tests=str(REPO / "tests"), repo=str(REPO), sizes=(100, 1000))
    out = run_process([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    small, large = (int(line) for line in out.stdout.split())
    assert large < 40 * 1024, (small, large)  # KiB


def test_mae_features_are_computed_one_loader_batch_at_a_time():
    info = fake_info()
    cfg = small_cfg("task=mae", "task.decoder_dim=16", "task.decoder_heads=2", "task.decoder_depth=1",
                    "data.eval_batch_size=16", "task.knn_random_baseline=true")
    from lightning.fabric import Fabric

    task = get_task("mae")
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    module = fabric.setup_module(task.build_module(cfg, info))
    ctx = EvalContext(fabric, cfg, info, {"test": image_loader(100, 16, info), "train": image_loader(150, 16, info)})
    with LargestPatchBatch() as seen, torch.no_grad():
        metrics = task.evaluate(module, ctx)
    assert {"test/knn_acc", "test/knn_acc_random_init"} <= set(metrics)
    assert len(seen.seen) == 2 and max(seen.seen.values()) == 16, seen.seen


def test_knn_similarities_are_computed_in_bounded_blocks(monkeypatch):
    torch.manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    test = torch.nn.functional.normalize(torch.randn(37, 8), dim=1)
    train_labels, test_labels = torch.randint(0, 4, (50,)), torch.randint(0, 4, (37,))
    # the DINO weighted vote over the full similarity matrix at once
    sims, idx = (test @ train.T).topk(5, dim=1)
    votes = torch.zeros(37, 4).scatter_add_(1, train_labels[idx], (sims / 0.07).exp())
    reference = 100.0 * (votes.argmax(1) == test_labels).sum().item() / 37

    blocks = []
    real_topk = torch.Tensor.topk

    def recording_topk(self, *args, **kwargs):
        blocks.append(tuple(self.shape))
        return real_topk(self, *args, **kwargs)
    monkeypatch.setattr(pixelformer.tasks.mae, "KNN_BLOCK_ELEMENTS", 3 * 50)
    monkeypatch.setattr(torch.Tensor, "topk", recording_topk)
    assert knn_accuracy(train, train_labels, test, test_labels, 5, 0.07, 4) == reference
    assert max(rows * cols for rows, cols in blocks) <= 3 * 50 and sum(rows for rows, _ in blocks) == 37


# ------------------------------------------------------------------------------------------- 2. float32 EMA
def test_float32_ema_of_a_bf16_model_follows_the_exact_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).to(torch.bfloat16)
    ema = EMA(model, decay=0.9999)
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values())
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    start = copy.deepcopy(model)  # what a bf16 EMA would start from
    exact = {k: v.double() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():  # the model drifts away from the average, as training does
            for p in model.parameters():
                p.add_(0.01)
        ema.update(model, step=10 ** 6)  # past warm-up: decay = 0.9999
        exact = {k: 0.9999 * v + 0.0001 * model.state_dict()[k].double() for k, v in exact.items()}
    for k, v in ema.module.state_dict().items():
        moved = (exact[k] - start.state_dict()[k].double()).abs()
        assert moved.min() > 5e-6, k  # 1e-4 of a 0.01-0.03 gap, three times
        assert (v.double() - exact[k]).abs().max() < 1e-7, k  # float32 rounding only
    # the same three updates of a bf16 average (without stochastic rounding) round away: why it is kept in float32
    bf16_ema = copy.deepcopy(start)
    for _ in range(3):
        with torch.no_grad():
            for a, b in zip(bf16_ema.parameters(), model.parameters()):
                a.lerp_(b, 1e-4)
    unchanged = torch.cat([(a == b).flatten() for a, b in zip(bf16_ema.parameters(), start.parameters())])
    assert unchanged.float().mean() > 0.9


# -------------------------------------------------------------------- trained checkpoints shared by the tests below
@pytest.fixture(scope="module")
def bf16_dit(tmp_path_factory):
    """A few bf16-true steps of a tiny dit with FID / sample accuracy against a tiny classifier."""
    root = tmp_path_factory.mktemp("scale")
    fit(tiny_cfg(root / "clf", "trainer.max_steps=3", "data.limit_train=64", "data.limit_test=32"))
    run_dir = root / "dit"
    metrics = fit(tiny_cfg(run_dir, "task=dit", "trainer.precision=bf16-true", "trainer.max_steps=4",
                           "data.batch_size=16", "data.limit_train=64", "data.limit_test=32", "task.ema_decay=0.9",
                           "task.sample_steps=2", "task.samples_per_class=1", "task.num_eval_samples=10",
                           f"task.classifier_ckpt={root / 'clf' / 'checkpoints' / 'last.ckpt'}"))
    return run_dir / "checkpoints" / "last.ckpt", metrics


@pytest.mark.slow
def test_bf16_true_dit_run_keeps_and_saves_a_float32_ema(bf16_dit):
    path, metrics = bf16_dit
    assert {"test/fid", "test/sample_acc", "test/fid_untrained"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    ckpt = read_checkpoint(path)
    assert {v.dtype for v in ckpt["ema"].values()} == {torch.float32}
    assert {v.dtype for v in ckpt["model"].values()} == {torch.bfloat16}
    # the EMA averaged in float32: it is not just the bf16 weights widened
    assert any(not torch.equal(v, v.bfloat16().float()) for v in ckpt["ema"].values())
    assert (path.parent.parent / "samples.png").stat().st_size > 0


# ------------------------------------------------------------------------------- 3. guidance needs label dropout
def test_guidance_without_label_dropout_is_refused_before_training():
    task = get_task("dit")
    with pytest.raises(UserError) as e:
        task.check(small_cfg("task=dit", "task.label_dropout=0", "task.cfg_scale=2.0"), fake_info())
    message = str(e.value)
    assert "\n" not in message and "task.label_dropout=0 with task.cfg_scale=2.0" in message
    assert "task.label_dropout>0 (DiT uses 0.1) or task.cfg_scale=1.0" in message
    task.build_module(small_cfg("task=dit", "task.label_dropout=0", "task.cfg_scale=1.0"), fake_info())


def load_sample_tool():
    spec = importlib.util.spec_from_file_location("pixelformer_sample_tool", REPO / "tools" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def no_dropout_ckpt(bf16_dit, tmp_path_factory):
    """The same checkpoint, as if trained with task.label_dropout=0."""
    ckpt = torch.load(bf16_dit[0], map_location="cpu", weights_only=True)
    ckpt["config"]["task"]["label_dropout"] = 0.0
    path = tmp_path_factory.mktemp("ld0") / "last.ckpt"
    torch.save(ckpt, path)
    return path


def test_sampling_tool_refuses_guidance_on_a_checkpoint_without_label_dropout(no_dropout_ckpt, tmp_path):
    tool = load_sample_tool()
    with pytest.raises(UserError) as e:
        tool.main([f"ckpt={no_dropout_ckpt}", "cfg_scale=4", "steps=2", "device=cpu", f"out={tmp_path}"])
    assert "trained with task.label_dropout=0" in str(e.value) and "sample with cfg_scale=1.0" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "samples.npz").exists()
    assert tool.main([f"ckpt={no_dropout_ckpt}", "cfg_scale=1", "num_samples=3", "steps=2", "device=cpu",
                      f"out={tmp_path}"]) == 0


# ----------------------------------------------------------------------------------------- 4. pictures in eval mode
def test_dit_samples_do_not_depend_on_the_denoisers_mode():
    from lightning.fabric import Fabric

    info = fake_info()
    cfg = small_cfg("task=dit", "task.label_dropout=0.5", "task.sample_steps=3")
    task = get_task("dit")
    trainer_module = task.build_module(cfg, info)
    denoiser = trainer_module.denoiser
    torch.manual_seed(1)
    with torch.no_grad():  # nudge every weight so that the label embedding matters
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    labels = torch.arange(10).repeat(2)

    def generate(module):
        return torch.cat([x for _, x in generate_chunks(trainer_module, module, labels, cfg, fabric.device)])
    torch.manual_seed(2)
    in_train_mode = generate(denoiser.train())
    assert denoiser.training  # put back as it was
    assert torch.equal(in_train_mode, generate(denoiser.eval()))


def test_mae_reconstructions_do_not_depend_on_the_modules_mode(tmp_path):
    info = fake_info()
    cfg = small_cfg("task=mae", "task.decoder_dim=16", "task.decoder_heads=2", "task.decoder_depth=1",
                    "model.depth=2", "model.drop_path_rate=0.5", "task.num_vis=4")  # block 1 drops paths
    task = get_task("mae")
    module = task.build_module(cfg, info)
    ctx = EvalContext(None, cfg, info, {"test": image_loader(8, 8, info)})
    (tmp_path / "train").mkdir()
    (tmp_path / "eval").mkdir()
    task.visualize(module.train(), ctx, tmp_path / "train", 0)
    assert module.training
    task.visualize(module.eval(), ctx, tmp_path / "eval", 0)
    assert not module.training
    assert (tmp_path / "train" / "reconstructions.png").read_bytes() == \
        (tmp_path / "eval" / "reconstructions.png").read_bytes()


# ---------------------------------------------------------------------------------------------- 5. bad inputs
TASK_MISTAKES = [
    ("dit", ["task.label_dropout=1.0"], "task.label_dropout must be in [0, 1), got 1.0"),
    ("dit", ["task.label_dropout=-0.1"], "task.label_dropout must be in [0, 1), got -0.1"),
    ("dit", ["task.sample_steps=0"], "task.sample_steps must be positive, got 0"),
    ("dit", ["task.sample_steps=2000"], "task.sample_steps=2000 exceeds task.num_train_timesteps=1000"),
    ("dit", ["task.num_train_timesteps=0"], "task.num_train_timesteps must be positive, got 0"),
    ("dit", ["task.num_eval_samples=0"], "task.num_eval_samples must be at least 2"),
    ("dit", ["task.cfg_scale=nan"], "task.cfg_scale must be a finite number, got nan"),
    ("dit", ["task.cfg_scale=inf"], "task.cfg_scale must be a finite number, got inf"),
    ("dit", ["task.ema_decay=1.5"], "task.ema_decay must be in [0, 1], got 1.5"),
    ("dit", ["task.ema_decay=-0.1"], "task.ema_decay must be in [0, 1], got -0.1"),
    ("dit", ["task.samples_per_class=0"], "task.samples_per_class must be positive, got 0"),
    ("mae", ["task.knn_k=0"], "task.knn_k must be positive, got 0"),
    ("mae", ["task.knn_temperature=0"], "task.knn_temperature must be a positive number, got 0.0"),
    ("mae", ["task.knn_temperature=nan"], "task.knn_temperature must be a positive number, got nan"),
    ("mae", ["task.decoder_heads=3"], "task.decoder_heads=3 does not divide task.decoder_dim=128: use one of 1, 2, 4"),
    ("mae", ["task.decoder_heads=0"], "task.decoder_heads=0 does not divide task.decoder_dim=128"),
    ("mae", ["task.decoder_dim=0"], "task.decoder_dim must be a positive multiple of 4"),
    ("mae", ["task.decoder_dim=30", "task.decoder_heads=2"], "task.decoder_dim must be a positive multiple of 4"),
    ("mae", ["task.decoder_depth=0"], "task.decoder_depth must be positive, got 0"),
    ("mae", ["task.num_vis=0"], "task.num_vis must be positive, got 0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("task_name,args,needle", TASK_MISTAKES, ids=[" ".join(m[1]) for m in TASK_MISTAKES])
def test_task_mistakes_are_refused_by_the_tasks_check(task_name, args, needle):
    with pytest.raises(UserError) as e:
        get_task(task_name).check(small_cfg(f"task={task_name}", *args), fake_info())
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_task_mistakes_stop_a_run_before_training(tmp_path):
    with pytest.raises(UserError, match="task.num_eval_samples must be at least 2"):
        fit(tiny_cfg(tmp_path / "run", "task=dit", "task.num_eval_samples=0", "trainer.max_steps=1"))
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


SAMPLE_MISTAKES = [
    (["class=10"], "class=10 is outside this checkpoint's classes: use 0 to 9"),
    (["class=-1"], "class=-1 is outside this checkpoint's classes"),
    (["class=cat"], "class=cat is not an integer"),
    (["cfg_scale=nan"], "cfg_scale=nan must be a finite number"),
    (["cfg_scale=high"], "cfg_scale=high is not a number"),
    (["steps=2000"], "steps=2000 exceeds the 1000 timesteps this checkpoint was trained with"),
    (["steps=0"], "steps=0 must be at least 1"),
    (["num_samples=0"], "num_samples=0 must be at least 1"),
    (["batch_size=0"], "batch_size=0 must be at least 1"),
    (["device=banana"], "device=banana is not a device: use cpu, cuda or cuda:N"),
    (["device=meta"], "device=meta: sampling runs on cpu, cuda or mps"),
    (["num_samples=2.5"], "num_samples=2.5 is not an integer"),
    (["num_samples=10000000000"], "num_samples=10000000000 keeps about"),
    (["sampler=euler"], "sampler=euler: choose one of ddpm, ddim, dpm"),
    (["cfg=2"], "unknown argument(s) cfg=2; options: ckpt="),
    ([f"device=cuda:{torch.cuda.device_count()}"] if torch.cuda.is_available() else ["device=cuda"],
     "CUDA device(s)" if torch.cuda.is_available() else "device=cuda but CUDA is not available on this machine"),
]


@pytest.mark.parametrize("args,needle", SAMPLE_MISTAKES, ids=[" ".join(m[0]) for m in SAMPLE_MISTAKES])
def test_sampling_tool_mistakes(args, needle, bf16_dit, tmp_path):
    tool = load_sample_tool()
    with pytest.raises(UserError) as e:
        tool.main([f"ckpt={bf16_dit[0]}", f"out={tmp_path}", "steps=2", "cfg_scale=2", *args])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "samples.npz").exists()


@pytest.mark.slow
def test_sampling_tool_prints_mistakes_without_a_traceback(no_dropout_ckpt, tmp_path):
    out = run_tool("sample", f"ckpt={no_dropout_ckpt}", "cfg_scale=4", "device=cpu", f"out={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert "was trained with task.label_dropout=0" in out.stderr


def test_sampling_tool_generates_in_chunks_of_batch_size(bf16_dit, tmp_path):
    tool = load_sample_tool()
    assert tool.main([f"ckpt={bf16_dit[0]}", "class=3", "num_samples=5", "batch_size=2", "steps=2", "cfg_scale=2",
                      "device=cpu", f"out={tmp_path}"]) == 0
    saved = np.load(tmp_path / "samples.npz")
    assert saved["arr_0"].shape == (5, 8, 8, 1) and saved["arr_1"].tolist() == [3] * 5


def test_sampling_tool_without_a_checkpoint_says_so():
    with pytest.raises(UserError, match=r"tools/sample.py needs ckpt=PATH \(a dit checkpoint\)"):
        load_sample_tool().main(["steps=2"])
