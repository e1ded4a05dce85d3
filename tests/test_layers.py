import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention

from pixelformer import create_backbone
from pixelformer.layers import PatchEmbed, build_sincos_2d_pos_embed, resize_pos_embed


def test_fused_and_manual_attention_agree():
    # The backbones' attention is timm's; its fused (SDPA) and manual paths agree.
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 17, 32)
    attn.fused_attn = True
    fused = attn(x)
    attn.fused_attn = False
    manual = attn(x)
    assert torch.allclose(fused, manual, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_never_mixes_images_of_a_batch(fused):
    # The public PiT re-implementation attends across the batch; here each image's output depends on it alone,
    # for the attention and for a whole backbone (CLS + register tokens, every block).
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    attn.fused_attn = fused
    x = torch.randn(5, 9, 32)
    out = attn(x)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(attn(x[perm]), out[perm], atol=1e-6)
    assert torch.allclose(attn(x[2:3]), out[2:3], atol=1e-6)  # alone == within a batch
    model = create_backbone("pit_mini", img_size=4, in_chans=1, depth=2, num_classes=3, reg_tokens=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    images = torch.randn(5, 1, 4, 4)
    logits = model(images)
    assert torch.allclose(model(images[perm]), logits[perm], atol=1e-5)
    assert torch.allclose(model(images[2:3]), logits[2:3], atol=1e-5)


def test_backbone_rejects_heads_that_do_not_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        create_backbone("pit_mini", embed_dim=30, num_heads=4)


def test_patch_embed_is_the_conv_it_replaces():
    torch.manual_seed(0)
    for patch in (1, 2, 4):
        embed = PatchEmbed(img_size=8, patch_size=patch, in_chans=3, embed_dim=16)
        x = torch.randn(2, 3, 8, 8)
        conv = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=patch).flatten(2).transpose(1, 2)
        assert torch.allclose(embed(x), conv, atol=1e-5)
        assert embed(x).shape == (2, (8 // patch) ** 2, 16)
        assert torch.equal(embed.unpatchify(embed.patchify(x)), x)


def test_patch_embed_explains_bad_sizes():
    for kwargs, needle in ((dict(img_size=10, patch_size=4), "not divisible"), (dict(img_size=8, patch_size=0), ">= 1")):
        try:
            PatchEmbed(in_chans=3, embed_dim=8, **kwargs)
        except ValueError as e:
            assert needle in str(e)
        else:
            raise AssertionError(f"{kwargs} accepted")
    embed = PatchEmbed(img_size=8, patch_size=1, in_chans=3, embed_dim=8)
    try:
        embed(torch.randn(1, 1, 8, 8))
    except ValueError as e:
        assert "in_chans" in str(e)
    else:
        raise AssertionError("wrong channel count accepted")


def test_sincos_table():
    table = build_sincos_2d_pos_embed(16, grid_size=4, num_prefix_tokens=1)
    assert table.shape == (1, 17, 16)
    assert torch.equal(table[0, 0], torch.zeros(16))  # CLS slot
    grid = table[0, 1:].reshape(4, 4, 16)
    # first half encodes the column, second half the row (MAE's and DiT's layout)
    assert torch.allclose(grid[0, 1, :8], grid[3, 1, :8]) and not torch.allclose(grid[0, 0, :8], grid[0, 1, :8])
    assert torch.allclose(grid[2, 0, 8:], grid[2, 3, 8:]) and not torch.allclose(grid[0, 0, 8:], grid[1, 0, 8:])
    assert len({tuple(v.tolist()) for v in table[0, 1:]}) == 16  # every position distinct


def test_resize_pos_embed():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, 4, num_prefix_tokens=1) is pe  # same grid: untouched
    up = resize_pos_embed(pe, 8, num_prefix_tokens=1)
    assert up.shape == (1, 1 + 64, 8)
    assert torch.equal(up[:, 0], pe[:, 0])  # the CLS token is kept apart
    # A constant field stays constant; a smooth one is reproduced at matching positions.
    const = torch.ones(1, 16, 8) * 0.5
    assert torch.allclose(resize_pos_embed(const, 8, 0), torch.full((1, 64, 8), 0.5), atol=1e-5)
    ramp = torch.linspace(0, 1, 16).reshape(4, 4).repeat_interleave(1, 0)
    ramp_pe = torch.arange(4.0).repeat(4).reshape(1, 16, 1).repeat(1, 1, 8)  # value = column index
    down = resize_pos_embed(resize_pos_embed(ramp_pe, 8, 0), 4, 0)
    assert torch.allclose(down, ramp_pe, atol=0.15)
    assert ramp.shape == (4, 4)
