"""Every registered backbone, built tiny on CPU: forward, backward, gradients everywhere (timm's model tests)."""
import pytest
import timm
import torch

from pixelformer import UserError, create_backbone, list_backbones
from pixelformer.models import VisionTransformer

TINY = dict(img_size=8, in_chans=3, depth=2, embed_dim=32, num_heads=2, num_classes=7)


@pytest.mark.parametrize("name", list_backbones())
def test_every_backbone_forward_backward(name):
    torch.manual_seed(0)
    model = create_backbone(name, **TINY)
    x = torch.randn(2, 3, 8, 8)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient for {param_name}"
    tokens = (8 // model.patch_embed.patch_size) ** 2
    assert model.forward_features(x).shape == (2, model.num_prefix_tokens + tokens, 32)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned", "none"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_position_embedding_and_pooling_kinds(pos_embed, pool):
    model = create_backbone("pit_tiny", **dict(TINY, pos_embed=pos_embed, pool=pool))
    names = dict(model.named_parameters())
    assert ("pos_embed" in names) == (pos_embed == "learned")
    assert ("cls_token" in names) == (pool == "cls")
    assert ("pos_embed" in model.state_dict()) == (pos_embed == "learned")  # fixed tables are not saved
    out = model(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    if pos_embed == "none":  # without positions a pixel transformer is permutation invariant (mean pool)
        x = torch.randn(1, 3, 8, 8)
        perm = torch.randperm(64)
        shuffled = x.flatten(2)[:, :, perm].reshape(1, 3, 8, 8)
        if pool == "mean":
            assert torch.allclose(model(x), model(shuffled), atol=1e-5)


def test_pit_tiny_parameter_count():
    # 12 x 192 x 3 heads, CLS token, learned positions, 1x1 pixel embedding, 100-class head at 32x32x3.
    model = create_backbone("pit_tiny", img_size=32, in_chans=3, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == 5_555_812
    assert model.patch_embed.num_patches == 1024


@pytest.mark.parametrize("name,depth,dim,heads", [
    ("pit_tiny", 12, 192, 3), ("pit_small", 12, 384, 6), ("vit_base", 12, 768, 12), ("vit_large", 24, 1024, 16),
    ("pit_huge", 32, 1280, 16),
])
def test_sizes_follow_the_standard_widths(name, depth, dim, heads):
    with torch.device("meta"):  # shapes only: no memory for the large sizes
        model = create_backbone(name, img_size=4, in_chans=3)
    assert (len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads) == (depth, dim, heads)
    assert model.blocks[0].mlp.fc1.out_features == 4 * dim


def test_unknown_backbone_and_bad_sizes_are_explained():
    with pytest.raises(UserError, match="Did you mean: pit_tiny"):
        create_backbone("pit_tinny")
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        create_backbone("vit_tiny", img_size=30, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="pixel transformer"):
        create_backbone("pit_tiny", patch_size=2)


def test_registered_with_timm_without_clashing():
    assert "pixelformer_pit_tiny" in timm.list_models("pixelformer_*")
    assert timm.is_model("pit_ti_224")  # timm's own Pooling-based ViT stays untouched
    model = timm.create_model("pixelformer_pit_mini", num_classes=5, img_size=8, in_chans=1)
    assert isinstance(model, VisionTransformer)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 5)


def test_timm_vision_transformer_weights_load_key_for_key():
    # Same names and layouts as timm's ViT: its weights load into ours and give the same outputs.
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=2, in_chans=3, num_classes=4, embed_dim=32, depth=2, num_heads=2)
    theirs = TimmViT(**kw).eval()
    ours = create_backbone("vit_tiny", **kw).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_learned_position_embedding_is_resized_on_load():
    torch.manual_seed(0)
    small = create_backbone("pit_mini", img_size=4, in_chans=1, pos_embed="learned", num_classes=3)
    big = create_backbone("pit_mini", img_size=8, in_chans=1, pos_embed="learned", num_classes=3)
    big.load_state_dict(small.state_dict())
    assert big.pos_embed.shape == (1, 1 + 64, 64)
    assert torch.equal(big.pos_embed[:, 0], small.pos_embed[:, 0])
    assert big(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    # set_input_size does the same in place
    small.set_input_size(8)
    assert torch.allclose(small.pos_embed, big.pos_embed)
    assert small(torch.randn(1, 1, 8, 8)).shape == (1, 3)


def test_grad_checkpointing_gives_the_same_result():
    torch.manual_seed(0)
    model = create_backbone("pit_tiny", **TINY).train()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    model.set_grad_checkpointing(True)
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_layer_ids_for_layer_wise_decay():
    model = create_backbone("pit_tiny", **TINY)
    assert model.layer_id("pos_embed") == 0 and model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("blocks.1.attn.qkv.weight") == 2
    assert model.layer_id("head.weight") == 3
