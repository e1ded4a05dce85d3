"""MAE: masking, loss, a tiny pretraining run, and weight transfer into the classifier."""
import json

import pytest
import torch

from pixelformer import CheckpointError, UserError, create_backbone
from pixelformer.checkpoint import load_backbone_weights, read_checkpoint
from pixelformer.config import compose_saved
from pixelformer.data import build_datasets
from pixelformer.engine import fit
from pixelformer.layers import build_sincos_2d_pos_embed
from pixelformer.models import MaskedAutoencoder, random_masking
from pixelformer.optim import param_groups
from pixelformer.task import get_task
from pixelformer.tasks.mae import knn_accuracy, masked_mse
from conftest import tiny_cfg


def test_random_masking_keeps_exactly_the_right_tokens():
    torch.manual_seed(0)
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64, 1).repeat(1, 1, 3)
    for ratio, keep in ((0.75, 16), (0.5, 32), (0.9, 6), (0.0, 64)):
        kept, mask, ids_restore = random_masking(x, ratio)
        assert kept.shape == (2, keep, 3)
        assert mask.shape == (2, 64) and (mask.sum(dim=1) == 64 - keep).all()
        for b in range(2):  # the kept tokens are exactly the unmasked ones
            assert sorted(kept[b, :, 0].tolist()) == sorted(x[b, mask[b] == 0, 0].tolist())
        restored = torch.cat([kept, torch.zeros(2, 64 - keep, 3)], dim=1).gather(
            1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
        assert torch.equal(restored[mask == 0], x[mask == 0])
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(x, 1.0)


def test_loss_ignores_visible_tokens():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 10, 3), torch.randn(2, 10, 3)
    mask = torch.zeros(2, 10)
    mask[:, :4] = 1
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[:, 4:] += 100.0  # visible tokens: no effect
    assert torch.equal(masked_mse(changed, target, mask), loss)
    changed[:, 0] += 1.0  # a masked token: counted
    assert masked_mse(changed, target, mask) > loss
    assert torch.allclose(loss, (pred[:, :4] - target[:, :4]).pow(2).mean())


@pytest.mark.parametrize("name,chans", [("pit_tiny", 1), ("pit_tiny", 3), ("vit_tiny", 3)])
def test_mae_shapes(name, chans):
    encoder = create_backbone(name, img_size=8, in_chans=chans, depth=1, embed_dim=32, num_heads=2)
    mae = MaskedAutoencoder(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    images = torch.randn(3, chans, 8, 8)
    pred, mask = mae(images, 0.75)
    p = encoder.patch_embed.patch_size
    assert pred.shape == (3, (8 // p) ** 2, p * p * chans) and mask.shape == (3, (8 // p) ** 2)
    assert mae.patchify(images).shape == pred.shape
    assert torch.equal(mae.unpatchify(mae.patchify(images)), images)
    pred.mean().backward()
    unused = [n for n, q in mae.named_parameters() if q.grad is None]
    assert unused == [], unused


def test_norm_pix_loss_is_refused_for_single_value_tokens(run_dir):
    with pytest.raises(UserError, match="single value"):
        fit(tiny_cfg(run_dir, "task=mae", "task.norm_pix_loss=true", "trainer.max_steps=1"))


def test_knn_accuracy():
    feats = torch.nn.functional.normalize(torch.eye(3).repeat(4, 1) + 0.01 * torch.randn(12, 3), dim=1)
    labels = torch.arange(3).repeat(4)
    assert knn_accuracy(feats, labels, feats, labels, k=3, temperature=0.07, num_classes=3) == 100.0
    assert knn_accuracy(feats, labels, feats, (labels + 1) % 3, k=3, temperature=0.07, num_classes=3) == 0.0


MAE_ARGS = ("task=mae", "data.limit_train=512", "data.batch_size=32", "trainer.max_epochs=6",
            "task.decoder_dim=32", "task.decoder_depth=1", "task.decoder_heads=2", "optim.lr=2e-3",
            "optim.warmup_epochs=1", "trainer.log_every_steps=4")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mae") / "run"
    metrics = fit(tiny_cfg(run_dir, *MAE_ARGS))
    return run_dir, metrics


@pytest.mark.slow
def test_tiny_mae_run_lowers_its_reconstruction_loss(mae_run):
    run_dir, metrics = mae_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"test/recon_loss", "test/knn_acc", "test/knn_acc_random_init"} <= set(metrics)
    assert (run_dir / "reconstructions.png").stat().st_size > 0


def test_mae_encoder_transfers_to_the_classifier_exactly(mae_run, tmp_path):
    run_dir, _ = mae_run
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(ckpt_path)
    mae_cfg = compose_saved(ckpt["config"], [])
    _, test_set, info = build_datasets(mae_cfg.data)
    mae = get_task("mae").build_module(mae_cfg, info)
    mae.load_state_dict(ckpt["model"])

    cls_cfg = tiny_cfg(tmp_path / "ft", f"init_from={ckpt_path}")
    cls_task = get_task("cls")
    classifier = cls_task.build_module(cls_cfg, info)
    report = cls_task.init_from(classifier, str(ckpt_path))
    assert report["reinitialised"] == ["head.bias", "head.weight"]
    assert any(k.startswith("decoder_") for k in report["dropped"]) and "mask_token" in report["dropped"]
    x = torch.stack([test_set[(0, i)][0] for i in range(4)])
    mae.eval(), classifier.eval()
    assert torch.equal(classifier.backbone.forward_features(x), mae.backbone.forward_features(x))
    # and a fine-tuning run starts from it through the config
    metrics = fit(tiny_cfg(tmp_path / "ft", f"init_from={ckpt_path}", "trainer.max_steps=3",
                           "optim.layer_decay=0.75"))
    assert "test/acc1" in metrics


def reference_mae_checkpoint(path, depth=1, dim=32):
    """A checkpoint in the public MAE code's format: {"model": state_dict} with timm ViT names + decoder keys."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    vit = TimmViT(img_size=8, patch_size=1, in_chans=1, num_classes=0, embed_dim=dim, depth=depth, num_heads=2)
    state = vit.state_dict()
    state["pos_embed"] = build_sincos_2d_pos_embed(dim, 8, num_prefix_tokens=1)  # MAE's fixed table
    vit.load_state_dict(state)
    state.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, dim),
                  "decoder_embed.bias": torch.zeros(16), "decoder_pos_embed": torch.zeros(1, 65, 16),
                  "decoder_blocks.0.norm1.weight": torch.ones(16), "decoder_norm.weight": torch.ones(16),
                  "decoder_pred.weight": torch.zeros(1, 16), "decoder_pred.bias": torch.zeros(1)})
    torch.save({"model": state, "epoch": 799}, path)
    return vit.eval()


def test_reference_format_mae_checkpoint_loads(tmp_path):
    vit = reference_mae_checkpoint(tmp_path / "mae_pretrain.pth")
    backbone = create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2,
                               pos_embed="learned", num_classes=10).eval()
    report = load_backbone_weights(backbone, tmp_path / "mae_pretrain.pth")
    assert "blocks.0.attn.qkv.weight" in report["loaded"] and "pos_embed" in report["loaded"]
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.bias"} <= set(report["dropped"])
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(backbone.forward_features(x), vit.forward_features(x), atol=1e-6)
    # with a fixed sin-cos model the checkpoint's table is checked equal to the model's own, which is used
    sincos = create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2,
                             pos_embed="sincos").eval()
    assert load_backbone_weights(sincos, tmp_path / "mae_pretrain.pth")["matched_fixed"] == ["pos_embed"]
    assert torch.allclose(sincos.forward_features(x), vit.forward_features(x), atol=1e-5)


def test_mismatching_pretrained_checkpoints_are_explained(tmp_path):
    reference_mae_checkpoint(tmp_path / "mae.pth", depth=2)
    shallow = create_backbone("pit_mini", img_size=8, in_chans=1, depth=1, embed_dim=32, num_heads=2,
                              pos_embed="learned")
    with pytest.raises(CheckpointError, match="blocks.1.attn.qkv.weight: in the checkpoint's encoder but not in"):
        load_backbone_weights(shallow, tmp_path / "mae.pth")
    wide = create_backbone("pit_mini", img_size=8, in_chans=1, depth=2, embed_dim=64, num_heads=2,
                           pos_embed="learned")
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight: checkpoint \(96, 32\) vs model"):
        load_backbone_weights(wide, tmp_path / "mae.pth")
    no_cls = create_backbone("pit_mini", img_size=8, in_chans=1, depth=2, embed_dim=32, num_heads=2, pool="mean")
    with pytest.raises(CheckpointError, match="cls_token"):
        load_backbone_weights(no_cls, tmp_path / "mae.pth")


def test_layer_wise_lr_decay_groups():
    model = create_backbone("pit_mini", img_size=4, in_chans=1, depth=2, embed_dim=16, num_heads=2, num_classes=3)
    groups = param_groups(torch.nn.ModuleDict({"backbone": model}), weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["head.weight"])] == 1.0
    assert scale_of[id(named["blocks.1.attn.qkv.weight"])] == 0.5
    assert scale_of[id(named["blocks.0.attn.qkv.weight"])] == 0.25
    assert scale_of[id(named["patch_embed.proj.weight"])] == 0.125
