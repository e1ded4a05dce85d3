"""The analysis tools (pixelformer/analysis.py, tools/analyze.py): attention weights recomputed outside the fused
kernel, mean attention distance, pixel permutations (data.permute_pixels) and the command on cls, mae and dit runs."""
import itertools
import json

import numpy as np
import pytest
import torch

from conftest import REPO, run_tool, tiny_cfg
from pixelformer.analysis import (accuracy, attention_rollout, attention_weights, mean_attention_distance,
                                  parse_options, token_positions)
from pixelformer.data import build_datasets, permute_pixels, pixel_permutation
from pixelformer.engine import fit
from pixelformer.errors import UserError
from pixelformer.models import create_backbone, create_dit
from pixelformer.saved import load_run


def _sharpen(model, factor=8.0):
    """Random init gives nearly uniform attention; larger q/k weights make the comparisons mean something."""
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(factor)
    return model


# ------------------------------------------------------------------------------------------- attention weights
def test_attention_weights_equal_timms_and_reproduce_the_fused_block_output():
    torch.manual_seed(0)
    model = _sharpen(create_backbone("vit_mini", img_size=8, in_chans=1, depth=2, embed_dim=32, num_heads=2,
                                     qk_norm=True, reg_tokens=1, init_values=0.5, pos_embed="learned")).eval()
    images = torch.randn(3, 1, 8, 8)
    assert all(block.attn.fused_attn for block in model.blocks)  # training's path forms no weights
    block_io = []
    hooks = [b.register_forward_hook(lambda m, a, o: block_io.append((a[0], o))) for b in model.blocks]
    with torch.no_grad():
        model.forward_features(images)
    for h in hooks:
        h.remove()
    weights = attention_weights(model, images)
    assert all(block.attn.fused_attn for block in model.blocks)  # left as it was
    assert [tuple(w.shape) for w in weights] == [(3, 2, 18, 18)] * 2  # 1 cls + 1 register + 16 patches
    # timm's own unfused path as the reference: the weights it hands to attn_drop
    reference = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o: reference.append(a[0]))
    with torch.no_grad():
        model.forward_features(images)
    for w, ref in zip(weights, reference):
        torch.testing.assert_close(w, ref, atol=1e-5, rtol=1e-4)
        assert w.amax() > 0.3  # sharp enough for the comparison to matter
    # the fused block's output, rebuilt from the recomputed weights
    for block, (x, out), w in zip(model.blocks, block_io, weights):
        attn = block.attn
        b, t, d = x.shape
        v = attn.qkv(block.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
        mixed = (w @ v).transpose(1, 2).reshape(b, t, d)
        y = x + block.ls1(attn.proj(mixed))
        y = y + block.ls2(block.mlp(block.norm2(y)))
        torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-4)


def test_attention_weights_of_the_dit_denoiser_equal_timms():
    torch.manual_seed(0)
    dit = create_dit("pit_mini", img_size=8, in_chans=1, num_classes=10, depth=2, embed_dim=32, num_heads=2)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it something to condition
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _sharpen(dit.backbone)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 10])
    weights = attention_weights(dit.backbone, x, forward=lambda images: dit(images, t, y))
    reference = []
    for block in dit.backbone.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, a, o: reference.append(a[0]))
    with torch.no_grad():
        dit(x, t, y)
    assert len(weights) == 2 and weights[0].shape == (2, 2, 64, 64)
    for w, ref in zip(weights, reference):
        torch.testing.assert_close(w, ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ attention distance
def _grid_mean_distance(grid: int, patch: int) -> float:
    """Mean distance between patch centres over all ordered pairs (self-pairs included), by brute force."""
    centres = [(i * patch + (patch - 1) / 2, j * patch + (patch - 1) / 2) for i in range(grid) for j in range(grid)]
    return float(np.mean([np.hypot(a[0] - b[0], a[1] - b[1]) for a, b in itertools.product(centres, centres)]))


def test_token_positions_are_patch_centres_in_pixels():
    pos = token_positions(4, 2)
    assert pos[0].tolist() == [0.5, 0.5] and pos[1].tolist() == [0.5, 2.5] and pos[4].tolist() == [2.5, 0.5]
    assert token_positions(3, 1).tolist()[-1] == [2.0, 2.0]


@pytest.mark.parametrize("grid,patch,prefix", [(8, 1, 0), (4, 2, 1), (5, 3, 2)])
def test_mean_attention_distance_of_hand_made_attention(grid, patch, prefix):
    n, t, heads = grid * grid, grid * grid + prefix, 3
    positions = token_positions(grid, patch)
    eye = torch.zeros(2, heads, t, t)
    eye[:, :, torch.arange(t), torch.arange(t)] = 1.0
    assert mean_attention_distance(eye, positions, prefix).tolist() == [0.0] * heads
    # uniform over the patch keys, with half of every row on the prefix keys: renormalised away
    uniform = torch.zeros(2, heads, t, t)
    uniform[..., prefix:] = (0.5 if prefix else 1.0) / n
    if prefix:
        uniform[..., :prefix] = 0.5 / prefix
    expected = _grid_mean_distance(grid, patch)
    torch.testing.assert_close(mean_attention_distance(uniform, positions, prefix),
                               torch.full((heads,), expected), atol=1e-5, rtol=1e-5)
    # every query looks one patch to its side (to the left in the last column): exactly one patch width
    side = torch.zeros(1, heads, t, t)
    for q in range(n):
        k = q + 1 if q % grid < grid - 1 else q - 1
        side[:, :, prefix + q, prefix + k] = 1.0
    torch.testing.assert_close(mean_attention_distance(side, positions, prefix),
                               torch.full((heads,), float(patch)))


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(2, 5, 5)
    assert torch.equal(attention_rollout([eye, eye, eye]), eye)
    mixed = attention_rollout([torch.full((1, 4, 4), 0.25)])
    torch.testing.assert_close(mixed.sum(-1), torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------- permutations
def test_pixel_permutation_is_a_fixed_bijection_applied_to_every_channel_alike():
    perm = pixel_permutation(6, seed=3)
    assert sorted(perm.tolist()) == list(range(36))
    assert torch.equal(perm, pixel_permutation(6, seed=3)) and not torch.equal(perm, pixel_permutation(6, seed=4))
    images = torch.randn(2, 3, 6, 6)
    shuffled = permute_pixels(images, perm)
    for c in range(3):
        for k in (0, 7, 35):
            assert shuffled[1, c].flatten()[k] == images[1, c].flatten()[perm[k]]
    assert torch.equal(permute_pixels(shuffled, perm.argsort()), images)
    assert torch.equal(permute_pixels(images, torch.arange(36)), images)


def test_data_permute_pixels_shuffles_train_and_test_after_resizing_and_augmentation(tmp_path):
    plain_train, plain_test, _ = build_datasets(tiny_cfg(tmp_path, "data.img_size=12", "data.augment=flip").data)
    train, test, info = build_datasets(tiny_cfg(tmp_path, "data.img_size=12", "data.augment=flip",
                                                "data.permute_pixels=5").data)
    perm = pixel_permutation(12, 5)
    assert info.img_size == 12
    assert torch.equal(test.ready, permute_pixels(plain_test.ready, perm))
    for key in ((11, 0), (12, 0), (99, 7)):  # the same flip (seeded per sample), then the shuffle
        assert torch.equal(train[key][0], permute_pixels(plain_train[key][0], perm))
    with pytest.raises(UserError, match="data.permute_pixels"):
        tiny_cfg(tmp_path, "data.permute_pixels=-1")


@pytest.mark.parametrize("model,pos_embed,pool,blind", [
    ("pit_mini", "none", "mean", True), ("pit_mini", "none", "cls", True),
    ("pit_mini", "sincos", "mean", False),  # positions break the symmetry
    ("vit_mini", "none", "mean", False),  # a pixel shuffle is no patch shuffle: patches see the order inside them
])
def test_a_pixel_transformer_without_positions_is_blind_to_pixel_order(tmp_path, model, pos_embed, pool, blind):
    _, plain, info = build_datasets(tiny_cfg(tmp_path, "data.limit_test=16").data)
    _, shuffled, _ = build_datasets(tiny_cfg(tmp_path, "data.limit_test=16", "data.permute_pixels=1").data)
    torch.manual_seed(0)
    net = _sharpen(create_backbone(model, img_size=8, in_chans=1, num_classes=10, depth=2, embed_dim=32,
                                   num_heads=2, pos_embed=pos_embed, pool=pool)).eval()
    with torch.no_grad():
        a, b = net(plain.ready), net(shuffled.ready)
    assert not torch.equal(plain.ready, shuffled.ready)
    gap = (a - b).abs().max().item()
    assert (gap < 1e-5) if blind else (gap > 1e-3), gap


# --------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cls") / "run"
    fit(tiny_cfg(run_dir, "trainer.max_steps=20", "data.batch_size=64", "optim.lr=3e-3", "model.depth=2",
                 "model.pos_embed=learned"))
    return run_dir


@pytest.mark.slow
def test_identity_permutation_gives_the_plain_accuracy(cls_run):
    cfg, info, _, module = load_run(cls_run / "checkpoints" / "best.ckpt")
    _, test_set, _ = build_datasets(cfg.data)
    loader = torch.utils.data.DataLoader(test_set, batch_size=64)
    with torch.no_grad():
        assert module.backbone(test_set.ready).argmax(1).unique().numel() > 1  # not one class for every image
    plain = accuracy(module, loader, info.num_classes)
    recorded = json.loads((cls_run / "eval.json").read_text())["metrics"]["test/acc1"]
    assert plain == pytest.approx(recorded, rel=1e-6)  # what the trainer measured
    assert accuracy(module, loader, info.num_classes, torch.arange(64)) == plain
    # a shuffle applied here is the one data.permute_pixels applies when the test split is built
    _, shuffled_set, _ = build_datasets(tiny_cfg(cls_run.parent / "x", "data.permute_pixels=2").data)
    shuffled = accuracy(module, torch.utils.data.DataLoader(shuffled_set, batch_size=64), info.num_classes)
    assert accuracy(module, loader, info.num_classes, pixel_permutation(8, 2)) == shuffled


@pytest.mark.slow
def test_analyze_a_cls_checkpoint(cls_run):
    from pixelformer.cli.analyze import main  # the program of tools/analyze.py and pixelformer-analyze

    assert main([f"ckpt={cls_run / 'checkpoints' / 'best.ckpt'}", "analysis.images=20", "analysis.map_images=2",
                 "analysis.permute_seed=4"]) == 0
    out = cls_run / "analysis"
    report = json.loads((out / "analysis.json").read_text())
    dist = report["attention_distance"]
    assert np.array(dist["per_layer_head"]).shape == (2, 2) and dist["images"] == 20
    assert dist["uniform_attention"] == pytest.approx(_grid_mean_distance(8, 1), rel=1e-5)
    assert all(0 < d < 8 * 2 ** 0.5 for row in dist["per_layer_head"] for d in row)
    recorded = json.loads((cls_run / "eval.json").read_text())["metrics"]["test/acc1"]
    perm = report["permutation"]
    assert perm["seed"] == 4 and perm["acc1"] == pytest.approx(recorded) and 0 <= perm["acc1_permuted"] <= 100
    pe = report["pos_embed"]
    assert pe["kind"] == "learned" and -1 <= pe["correlation_with_distance"] <= 1
    assert sorted(report["files"]) == ["attention_distance.png", "attention_maps_0.png", "attention_maps_1.png",
                                       "pos_embed_similarity.png"]
    assert all((out / f).stat().st_size > 1000 for f in report["files"])
    # two analysed runs side by side (here the same run twice), and what compare= refuses
    figure = cls_run / "compare.png"
    assert main([f"compare={cls_run},{out / 'analysis.json'}", f"out={figure}", "labels=PiT,again"]) == 0
    assert figure.stat().st_size > 1000
    with pytest.raises(UserError, match="2 labels for 1 runs"):
        main([f"compare={cls_run}", f"out={figure}", "labels=a,b"])
    with pytest.raises(UserError, match="neither an analysis.json nor a run analysed"):
        main([f"compare={cls_run / 'checkpoints'}", f"out={figure}"])


@pytest.mark.slow
def test_analysis_goes_to_wandb_when_the_run_logs_there(cls_run, tmp_path, monkeypatch):
    from pixelformer.cli.analyze import main

    monkeypatch.setenv("WANDB_MODE", "offline")  # as a run with logger=offline would have it
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    main([f"ckpt={cls_run}", "analysis.images=4", "analysis.map_images=1", f"analysis.out={tmp_path}"])
    import wandb

    # What the end of a user's process does: W&B's service writes the offline record in its own process, and under
    # load it had written only the file's header when this test read it in the same process.
    wandb.teardown()
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"analysis/acc1_permuted" in data and b"analysis/attention_distance/block_2_head_1" in data
    assert b"attention_maps_0" in data and b"pos_embed_similarity" in data


def test_analyze_mae_runs_on_the_encoder_and_says_there_is_no_accuracy(tmp_path):
    from pixelformer.cli.analyze import main

    run_dir = tmp_path / "mae"
    fit(tiny_cfg(run_dir, "task=mae", "trainer.max_steps=2", "task.decoder_dim=32", "task.decoder_depth=1",
                 "task.decoder_heads=2", "task.knn_random_baseline=false", "data.limit_train=64"))
    main([f"ckpt={run_dir}", "analysis.images=8", "analysis.map_images=1", f"analysis.out={tmp_path / 'out'}"])
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert "no classifier" in report["permutation"]["skipped"]
    assert "sin-cos" in report["pos_embed"]["skipped"]  # pit_mini's fixed table
    assert any("encoder" in n for n in report["notes"])
    assert np.array(report["attention_distance"]["per_layer_head"]).shape == (1, 2)


@pytest.mark.slow
def test_analyze_dit_runs_on_the_denoiser_with_its_ema(tmp_path, capsys):
    from pixelformer.cli.analyze import main

    run_dir = tmp_path / "dit"
    fit(tiny_cfg(run_dir, "task=dit", "trainer.max_steps=2", "task.sample_steps=2", "task.samples_per_class=1",
                 "task.untrained_baseline=false", "data.limit_train=64", "data.limit_test=32"))
    main([f"ckpt={run_dir}", "analysis.images=4", "analysis.map_images=1", "analysis.timestep=100"])
    report = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert report["weights"] == "ema" and "timestep 100" in report["notes"][0]
    assert "no classifier" in report["permutation"]["skipped"]
    assert "pixel permutation: skipped" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"analysis.timestep=1000 .* use 0 to 999"):
        main([f"ckpt={run_dir}", "analysis.timestep=1000", f"analysis.out={tmp_path / 'refused'}"])
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_bad_analysis_input_is_one_line(cls_run, tmp_path):
    out = run_tool("analyze", f"ckpt={tmp_path / 'nope.ckpt'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "ckpt=" in out.stderr and "no such checkpoint" in out.stderr
    with pytest.raises(UserError, match=r"Did you mean.*analysis.imgs"):
        parse_options(["analysis.imgs=3"])
    with pytest.raises(UserError, match=r"analysis.images=0 must be at least 1 \(test images .*default 64\)"):
        parse_options(["analysis.images=0"])
    with pytest.raises(UserError, match=r"could not be converted to Integer \(key: analysis.images\)"):
        parse_options(["analysis.images=abc"])
    with pytest.raises(UserError, match=r"analysis.device=gpu is not a device .* use cpu, cuda or cuda:N"):
        parse_options(["analysis.device=gpu"])
    with pytest.raises(UserError, match=r"analysis.queries=9"):
        parse_options(["analysis.queries=9"])
    with pytest.raises(UserError, match=r"analysis.weights=best"):
        parse_options(["analysis.weights=best"])
    with pytest.raises(UserError, match=r"needs ckpt=PATH"):
        from pixelformer.cli.analyze import main
        main(["analysis.images=3"])
    assert (REPO / "tools" / "analyze.py").read_text().count("\n") == 12
