"""The backbone contract (pixelformer/models/backbone.py), held over the whole registry x every task that uses a
backbone: a family registered tomorrow is covered here with no edit.

For each pair the task either builds and trains at a tiny size (forward, backward, every trainable parameter gets a
gradient; an image's output does not depend on the other images of its batch; the state dict round-trips; a new
input resolution works), or refuses the pair at config time with one line naming the part it lacks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_cfg
from pixelformer import UserError
from pixelformer.data import DataInfo
from pixelformer.models import PARTS, Backbone, create_backbone, describe_backbone, list_backbones
from pixelformer.rng import per_sample_seeds
from pixelformer.task import check_backbone_parts, get_task

DIGITS = DataInfo("digits", 10, 1, 8, (0.5,), (0.25,))
TASKS = ("cls", "mae", "dit", "linprobe")


def build(tmp_path, task: str, name: str) -> tuple[object, nn.Module]:
    cfg = tiny_cfg(tmp_path, f"task={task}", f"model={name}")
    return cfg, get_task(task).build_module(cfg, DIGITS)


def batch(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.randn(n, 1, 8, 8), torch.tensor([1, 4, 7, 2][:n])


def outputs(task: str, module: nn.Module, images: torch.Tensor, labels: torch.Tensor,
            seeds: list[int]) -> torch.Tensor:
    """What the task computes per image, its random draws made per sample (so a sample's draw is its own)."""
    with torch.no_grad(), per_sample_seeds(seeds):
        if task == "dit":
            t = torch.tensor([5, 500, 900, 50])[seeds]
            return module.denoiser(images, t, labels)
        if task == "mae":
            return module((images, labels))["pred"]
        return module((images, labels))["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_serves_every_task_or_is_refused_in_one_line(tmp_path, name, task):
    cfg, parts = tiny_cfg(tmp_path, f"task={task}", f"model={name}"), get_task(task).backbone_parts
    with torch.device("meta"):
        supports = create_backbone(name, img_size=8, in_chans=1, depth=1).supports
    if not set(parts) <= supports:
        with pytest.raises(UserError) as refused:
            check_backbone_parts(cfg, DIGITS, parts, task)
        message = str(refused.value)
        assert "\n" not in message and f"task={task}" in message and f"model={name}" in message
        return
    check_backbone_parts(cfg, DIGITS, parts, task)
    torch.manual_seed(0)
    _, module = build(tmp_path, task, name)
    assert isinstance(module.backbone, Backbone)  # every task names its backbone one way
    module.train()
    images, labels = batch()
    with per_sample_seeds([0, 1, 2]):
        loss = module((images, labels))["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], missing
    # one image's output does not depend on the others of its batch
    module.eval()
    together = outputs(task, module, images, labels, [0, 1, 2])
    for i in range(len(images)):
        alone = outputs(task, module, images[i:i + 1], labels[i:i + 1], [i])
        torch.testing.assert_close(alone[0], together[i], atol=2e-5, rtol=1e-4)
    # checkpoint round trip: a fresh module loads the state dict and computes the same
    torch.manual_seed(5)
    _, fresh = build(tmp_path, task, name)
    fresh.load_state_dict(module.state_dict())
    fresh.eval()
    torch.testing.assert_close(outputs(task, fresh, images, labels, [0, 1, 2]), together, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_keeps_the_contract(name):
    torch.manual_seed(0)
    model = create_backbone(name, img_size=8, in_chans=1, depth=2, embed_dim=32, num_heads=2, num_classes=5)
    assert isinstance(model, Backbone) and model.supports <= set(PARTS)
    layout, x = model.token_layout(), torch.randn(2, 1, 8, 8)
    tokens = model.embed_patches(x)
    assert tokens.shape == (2, layout.num_patches, 32)
    features = model.forward_tokens(model.prepend_prefix(tokens))
    assert features.shape == (2, layout.tokens, 32)  # input-level tokens out, whatever happens inside
    torch.testing.assert_close(model.forward_features(x), features)
    assert model.forward_head(features).shape == (2, 5) and model.forward_head(features, pre_logits=True).shape[0] == 2
    info = describe_backbone(name, img_size=8, in_chans=1, depth=2, flops=True)
    assert info["tokens"] == layout.tokens and info["gflops"] > 0 and info["levels"][0] == layout.num_patches
    if "intermediates" in model.supports:
        final, maps = model.forward_intermediates(x, indices=2)
        assert len(maps) == 2 and all(m.ndim == 4 and m.shape[:2] == (2, 32) for m in maps)
    if "attention_maps" in model.supports:
        sites = model.attention_sites()
        assert len(sites) == len(model.condition_blocks())
        assert all(s.grid_size in [grid for grid, _ in layout.levels] for s in sites)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision runs (token_cost's and the trainer's bf16)
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    if "resize" in model.supports:  # the same weights at 16x16
        model.set_input_size(16)
        assert model.forward_features(torch.randn(1, 1, 16, 16)).shape[1] == model.token_layout().tokens
        assert model.token_layout().num_patches == (16 // layout.patch_size) ** 2


@pytest.mark.parametrize("name", ["pit_local_mini", "pit_hourglass_mini"])
def test_local_attention_distance_is_bounded_by_its_window(name):
    """The analysis sees what local attention computes: no weight outside a query's k x k neighbourhood, so each
    pixel-level block's mean attention distance is at most the window's half-diagonal."""
    from pixelformer.analysis import attention_weights, mean_attention_distance, token_positions

    torch.manual_seed(0)
    model = create_backbone(name, img_size=16, in_chans=1, depth=2, embed_dim=32, num_heads=2, kernel=3,
                            class_token=False, global_pool="avg", pos_embed="learned")
    for block in model.blocks:
        block.attn.qkv.weight.data.mul_(8)
    sites = model.attention_sites()
    weights = attention_weights(model, torch.randn(2, 1, 16, 16))
    local = [(s, w) for s, w in zip(sites, weights) if s.window is not None]
    assert local
    for site, w in local:
        grid = site.grid_size[0]
        distance = mean_attention_distance(w, token_positions(grid, site.stride), site.num_prefix_tokens)
        assert distance.max() <= site.stride * 2 ** 0.5 * (site.window[0] // 2) + 1e-5
        keys_seen = (w[..., site.num_prefix_tokens:, site.num_prefix_tokens:] > 0).sum(-1)  # per query
        assert keys_seen.max() == site.window[0] * site.window[1]
