"""The contract every registered task keeps (what a fourth task must do to plug in), checked over ``list_tasks()``."""
import json
import math
import os
import sys

import pytest
import torch
from lightning.fabric import Fabric

from pixelformer.data import build_datasets
from pixelformer.engine import evaluate_checkpoint, fit
from pixelformer.saved import load_run
from pixelformer.task import EvalContext, get_task, list_tasks
from pixelformer.trainer import EMA, eval_loaders, run_evaluation
from conftest import QUIET, TINY_MODEL, tiny_cfg, run_process

# Per task, what makes it tiny and quick (the model itself is tiny_cfg's 1-block, 32-wide PiT).
QUICK = {
    "cls": [],
    "mae": ["task.decoder_dim=16", "task.decoder_heads=2", "task.decoder_depth=1"],
    "dit": ["task.sample_steps=2", "task.samples_per_class=1"],
    "linprobe": [],  # without init_from: the probe of a randomly initialised backbone (it warns)
    "vae": ["task.block_out_channels=[8,16]", "task.norm_num_groups=8", "task.scale_images=32"],
}


def test_every_registered_task_has_quick_settings_here():
    assert sorted(QUICK) == list_tasks()


@pytest.mark.parametrize("name", list_tasks())
def test_task_builds_trains_and_evaluates_its_monitored_metric(name, tmp_path):
    cfg = tiny_cfg(tmp_path, f"task={name}", "data.limit_train=64", "data.limit_test=32", "data.batch_size=16",
                   *QUICK.get(name, []))
    task = get_task(name)
    train_set, test_set, info = build_datasets(cfg.data)
    task.check(cfg, info)
    torch.manual_seed(0)
    module = task.build_module(cfg, info)
    batch = next(iter(torch.utils.data.DataLoader(train_set, batch_size=8)))
    out = module(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable
    assert [n for n, p in trainable if p.grad is None] == []  # every trainable parameter is reached

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    ema = EMA(module.get_submodule(task.ema_target), 0.9).module if task.ema_target else None
    ctx = EvalContext(fabric, cfg, info, eval_loaders(fabric, cfg, train_set, test_set), ema)
    metrics = run_evaluation(task, fabric.setup_module(module), ctx)
    assert vars(task) == {}  # stateless: what lives across evaluations is in ctx.cache
    monitor, mode = task.monitor(cfg)
    assert mode in ("min", "max") and monitor in metrics and math.isfinite(metrics[monitor])


@pytest.mark.slow
@pytest.mark.parametrize("name", list_tasks())
def test_task_checkpoint_round_trips(name, tmp_path):
    run_dir = tmp_path / "run"
    final = fit(tiny_cfg(run_dir, f"task={name}", "data.limit_train=64", "data.limit_test=32", "data.batch_size=16",
                         "trainer.max_steps=2", *QUICK.get(name, [])))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cfg, info, task, module = load_run(run_dir)  # a run directory stands for its last.ckpt
    assert task.name == name and cfg.task.name == name and info.img_size == 8
    assert not module.training
    state = module.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    if task.ema_target is not None:
        averaged = load_run(run_dir, weights="ema").module.get_submodule(task.ema_target).state_dict()
        assert all(torch.equal(averaged[k], ckpt["ema"][k]) for k in ckpt["ema"])
    # evaluated again from the file, the run scores what it reported when it finished
    again, _, _ = evaluate_checkpoint(run_dir / "checkpoints" / "last.ckpt", [])
    recorded = json.loads((run_dir / "eval.json").read_text())["metrics"]
    assert final == recorded
    assert {k: again[k] for k in again} == pytest.approx({k: v for k, v in recorded.items() if k != "epoch"})


FOURTH_TASK = '''
"""A fourth task, outside pixelformer: reconstruct every pixel from the unmasked image (a plain autoencoder)."""
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from pixelformer.task import Task, TaskCfg, build_backbone, mean_loss, register_task


@dataclass
class ReconCfg(TaskCfg):
    name: str = "recon"


class Recon(nn.Module):
    def __init__(self, backbone, pixels):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.embed_dim, pixels)

    def forward(self, batch):
        images, _ = batch
        pred = self.head(self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True))
        return {"loss": F.mse_loss(pred, images.flatten(1))}


@register_task
class ReconTask(Task):
    name = "recon"
    config_cls = ReconCfg

    def build_module(self, cfg, data):
        return Recon(build_backbone(cfg, data), data.in_chans * data.img_size ** 2)

    def evaluate(self, module, ctx):
        return {"test/loss": mean_loss(ctx.fabric, module, ctx.loaders["test"])}
'''


@pytest.mark.slow
def test_a_fourth_task_plugs_in_through_an_entry_point(tmp_path):
    # A package of the user's own, found through the pixelformer.tasks entry-point group: no pixelformer file changes.
    site = tmp_path / "site"
    (site / "recon_task-0.1.dist-info").mkdir(parents=True)
    (site / "recon_task.py").write_text(FOURTH_TASK)
    (site / "recon_task-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: recon-task\n"
                                                                "Version: 0.1\n")
    (site / "recon_task-0.1.dist-info" / "entry_points.txt").write_text("[pixelformer.tasks]\nrecon = recon_task\n")
    args = [*QUIET, *TINY_MODEL, "task=recon", "trainer.max_steps=3", "trainer.precision=32-true",
            f"run.dir={tmp_path / 'run'}"]
    script = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
              "from pixelformer import compose, fit\nfrom pixelformer.task import list_tasks\n"
              f"assert list_tasks() == {sorted([*list_tasks(), 'recon'])!r}, list_tasks()\n"
              f"print(fit(compose({args!r})))\n")
    out = run_process([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'test/loss'" in out.stdout and (tmp_path / "run" / "eval.json").exists()
