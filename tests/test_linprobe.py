"""task=linprobe: a frozen backbone (parameters, mode and values), a BatchNorm without affine + linear head that
trains, init_from MAE and cls checkpoints, load_run, two processes."""
import json
import math

import pytest
import torch
from torch import nn

from pixelformer.checkpoint import read_checkpoint
from pixelformer.data import build_datasets
from pixelformer.engine import fit
from pixelformer.errors import UserError
from pixelformer.optim import build_optimizer
from pixelformer.saved import load_run
from pixelformer.task import get_task
from conftest import QUIET, TINY_MODEL, run_tool, tiny_cfg

SMALL = ["data.limit_train=64", "data.limit_test=32", "data.batch_size=16"]
MAE_QUICK = ["task.decoder_dim=16", "task.decoder_heads=2", "task.decoder_depth=1", "task.knn_random_baseline=false"]


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A 2-step MAE run of the tiny model: its encoder is what the probes load."""
    run_dir = tmp_path_factory.mktemp("mae") / "run"
    fit(tiny_cfg(run_dir, "task=mae", *SMALL, "trainer.max_steps=2", *MAE_QUICK))
    return run_dir / "checkpoints" / "last.ckpt"


def encoder_state(ckpt_path):
    """The MAE checkpoint's encoder, under the backbone's names."""
    model = read_checkpoint(ckpt_path)["model"]
    return {k[len("model.encoder."):]: v for k, v in model.items() if k.startswith("model.encoder.")}


def build_probe(tmp_path, *overrides):
    cfg = tiny_cfg(tmp_path, "task=linprobe", *SMALL, *overrides)
    info = build_datasets(cfg.data)[2]
    return cfg, get_task("linprobe").build_module(cfg, info)


def test_the_probe_freezes_every_backbone_parameter_and_trains_only_its_head(tmp_path):
    cfg, probe = build_probe(tmp_path, "model.drop_path_rate=0.5", "model.drop_rate=0.5")
    assert [n for n, p in probe.backbone.named_parameters() if p.requires_grad] == []
    norm, linear = probe.head
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert [n for n, _ in probe.named_parameters() if not n.startswith("backbone.")] == ["head.1.weight",
                                                                                          "head.1.bias"]
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.3) and not linear.bias.any()
    # train() trains the head (batch statistics) and leaves the backbone in eval mode: no dropout, no drop path
    probe.train()
    assert probe.head.training and not any(m.training for m in probe.backbone.modules())
    images = torch.randn(4, 1, 8, 8)
    assert torch.equal(probe.features(images), probe.features(images))
    # the optimizer holds the head's parameters only
    optimizer = build_optimizer(probe, cfg.optim, torch.device("cpu"))
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(linear.weight), id(linear.bias)}
    assert cfg.optim.name == "sgd" and cfg.optim.weight_decay == 0  # the probe's default (optim/linprobe.yaml)


def test_a_probe_from_an_mae_checkpoint_trains_its_head_and_leaves_the_backbone_byte_for_byte(mae_ckpt, tmp_path):
    run_dir = tmp_path / "probe"
    metrics = fit(tiny_cfg(run_dir, "task=linprobe", f"init_from={mae_ckpt}", *SMALL, "trainer.max_steps=2"))
    assert math.isfinite(metrics["test/acc1"])
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]
    encoder = encoder_state(mae_ckpt)
    backbone = {k[len("backbone."):]: v for k, v in saved.items() if k.startswith("backbone.")}
    assert backbone.keys() == encoder.keys()
    assert all(torch.equal(backbone[k], encoder[k]) for k in encoder)  # loaded, then never changed
    # the head trained: it left its initialisation, and the batch norm gathered running statistics
    torch.manual_seed(0)
    _, fresh = build_probe(tmp_path)
    assert not torch.equal(saved["head.1.bias"], fresh.head[1].bias.detach())
    assert saved["head.0.num_batches_tracked"] == 2 and not torch.equal(saved["head.0.running_var"],
                                                                        torch.ones_like(saved["head.0.running_var"]))
    assert not any(k.startswith("head.0.") and k.endswith(("weight", "bias")) for k in saved)  # affine=False

    # the checkpoint reloads as a run, and scores what it reported
    cfg, info, task, module = load_run(run_dir)
    assert task.name == "linprobe" and cfg.init_from == str(mae_ckpt)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in saved.items())
    assert not any(p.requires_grad for p in module.backbone.parameters())
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["metrics"] == metrics and sum(map(sum, report["details"]["confusion_matrix"])) == 32
    assert (run_dir / "confusion_matrix.png").exists()


def test_a_probe_loads_a_cls_checkpoints_backbone(tmp_path):
    cls_dir = tmp_path / "cls"
    fit(tiny_cfg(cls_dir, *SMALL, "trainer.max_steps=2"))
    cls_model = read_checkpoint(cls_dir / "checkpoints" / "last.ckpt")["model"]
    cfg, probe = build_probe(tmp_path)
    report = get_task("linprobe").init_from(probe, str(cls_dir / "checkpoints" / "last.ckpt"))
    assert report["dropped"] == ["head.bias", "head.weight"]  # the classifier's own head, not the probe's
    state = probe.backbone.state_dict()
    assert all(torch.equal(state[k], cls_model[f"backbone.{k}"]) for k in state)
    assert not any(p.requires_grad for p in probe.backbone.parameters())


def test_without_init_from_the_probe_warns_that_it_probes_a_random_backbone(tmp_path):
    cfg = tiny_cfg(tmp_path, "task=linprobe", *SMALL)
    with pytest.warns(UserWarning, match="without init_from .* randomly initialised .* init_from=<mae or cls"):
        get_task("linprobe").check(cfg, build_datasets(cfg.data)[2])


def test_a_pooling_layer_the_checkpoint_lacks_is_refused(mae_ckpt, tmp_path):
    _, probe = build_probe(tmp_path, "model.global_pool=map", "model.class_token=true")  # else as the MAE
    with pytest.raises(UserError, match=r"no attention pool .* model.pool=cls or model.pool=mean"):
        get_task("linprobe").init_from(probe, str(mae_ckpt))


@pytest.mark.slow
def test_a_probe_on_two_processes_counts_every_test_image_once(mae_ckpt, tmp_path):
    # torchmetrics sums the two processes' confusion matrices; DDP sees only the head's parameters as trainable
    run_dir = tmp_path / "ddp"
    out = run_tool("train", *QUIET, *TINY_MODEL, "task=linprobe", f"init_from={mae_ckpt}", "trainer=ddp",
                   "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=2", "data.limit_test=45",
                   "data.batch_size=16", f"run.dir={run_dir}", timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads((run_dir / "eval.json").read_text())
    matrix = torch.tensor(report["details"]["confusion_matrix"])
    assert matrix.sum() == 45  # 23 + 22 images on the two processes, each counted once
    assert 100 * matrix.trace().item() / 45 == pytest.approx(report["metrics"]["test/acc1"])
    saved = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["model"]
    encoder = encoder_state(mae_ckpt)
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in encoder.items())
