"""Neighbourhood attention layer: the mask, the flex and masked-SDPA paths against plain attention, token orders."""
from __future__ import annotations

import inspect

import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from pixelformer.layers.local_attention import (
    LocalAttention,
    _Layout,
    best_token_order,
    block_sparsity,
    local_attention_layer,
    neighbourhood_mask,
    tile_order,
)

ATOL = 1e-5
CUDA = torch.cuda.is_available()


def reference_attention(module: LocalAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention with the same weights and a -inf outside ``mask``: what every path must equal."""
    B, N, C = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    scores = (q @ k.transpose(-2, -1)) * module.head_dim ** -0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return module.proj(module.norm(out.transpose(1, 2).reshape(B, N, -1)))


def make(backend: str = "sdpa_mask", grid=(6, 5), kernel=3, prefix: int = 1, **kw) -> LocalAttention:
    torch.manual_seed(0)
    return LocalAttention(32, num_heads=2, kernel=kernel, grid_size=grid, num_prefix_tokens=prefix, backend=backend,
                          qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm, **kw).eval()


def tokens(module: LocalAttention, batch: int = 2, requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, module.num_tokens, 32, requires_grad=requires_grad)


@pytest.mark.parametrize("grid,kernel", [((7, 7), 3), ((9, 6), (5, 3)), ((4, 4), 5)])
def test_shift_mask_gives_every_query_k_squared_keys(grid, kernel):
    gh, gw = grid
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    m = neighbourhood_mask(gh, gw, kernel, num_prefix_tokens=2)
    assert m.shape == (2 + gh * gw,) * 2
    assert m[:2].all() and m[:, :2].all()  # prefix tokens see and are seen by all
    grid_part = m[2:, 2:]
    assert (grid_part.sum(1) == min(kh, gh) * min(kw, gw)).all()
    assert grid_part.diagonal().all()
    # symmetric between queries at least k // 2 from the border (shifted border windows are not)
    r = torch.arange(gh).repeat_interleave(gw)
    c = torch.arange(gw).repeat(gh)
    inner = (r >= kh // 2) & (r < gh - kh // 2) & (c >= kw // 2) & (c < gw - kw // 2)
    sub = grid_part[inner][:, inner]
    assert torch.equal(sub, sub.T)


def test_clip_mask_is_symmetric_and_local():
    m = neighbourhood_mask(6, 8, 3, border="clip")
    assert torch.equal(m, m.T)
    assert m.sum(1).min() == 4 and m.sum(1).max() == 9  # corner 2x2, interior 3x3
    q = 3 * 8 + 4  # (3, 4)
    keys = {(int(i) // 8, int(i) % 8) for i in m[q].nonzero()}
    assert keys == {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}


def test_tile_order_is_a_permutation_and_its_inverse():
    perm, inv = tile_order(10, 12, (4, 8))
    assert torch.equal(perm.sort().values, torch.arange(120))
    assert torch.equal(perm[inv], torch.arange(120))
    assert perm[:8].tolist() == list(range(8))  # first row of the first tile
    assert perm[8].item() == 12  # then the tile's second row


def test_block_table_equals_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    for order, border, prefix_last in [(None, "shift", True), (tile_order(20, 20, (8, 16))[0], "shift", False),
                                       (tile_order(20, 20, (4, 32))[0], "clip", True)]:
        layout = _Layout(20, 20, 5, 2, border, order, prefix_last=prefix_last)
        ours = layout.block_mask(block=64)
        ref = create_block_mask(layout.mask_mod(), None, None, layout.n, layout.n, device="cpu", BLOCK_SIZE=64)
        assert torch.equal(ours.to_dense(), ref.to_dense())
        assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)
        assert ours.sparsity() == pytest.approx(ref.sparsity())


def test_block_sparsity_counts_and_best_order():
    assert block_sparsity(28, 28, 7) == pytest.approx(59.18, abs=0.01)
    tile, s = best_token_order(64, 64, 7)
    assert tile is None and s == pytest.approx(84.77, abs=0.01)  # raster: a block is two whole rows


def test_sdpa_mask_path_equals_plain_masked_attention_forward_and_grad():
    m = make("sdpa_mask")
    x = tokens(m, requires_grad=True)
    out = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_attention(m, x_ref, m.dense_mask(x.device))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x_ref, *m.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grid,kernel,prefix,border", [((6, 5), 3, 1, "shift"), ((13, 11), 5, 2, "shift"),
                                                       ((9, 20), (3, 5), 0, "clip"), ((5, 5), 7, 1, "shift")])
def test_tiled_path_equals_plain_masked_attention_forward_and_grad(grid, kernel, prefix, border):
    # grids not divisible by the 8 x 8 query tile (padded edge tiles), prefix tokens, both borders, kernel > grid
    m = make("tiled", grid=grid, kernel=kernel, prefix=prefix, border=border)
    x = tokens(m, requires_grad=True)
    out = m(x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = reference_attention(m, x_ref, m.dense_mask(x.device))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    grads_ref = torch.autograd.grad(ref, [x_ref, *m.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_set_grid_size_rebuilds_the_mask():
    m = make("tiled", grid=(6, 5), kernel=3, prefix=1)
    m(tokens(m))
    m.set_grid_size((4, 7))
    assert m.num_tokens == 29 and m.dense_mask(torch.device("cpu")).shape == (29, 29)
    x = tokens(m)
    torch.testing.assert_close(m(x), reference_attention(m, x, m.dense_mask(x.device)), atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("tile", [None, (2, 4), "auto"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_equals_masked_attention(tile):
    m = make("flex", tile=tile, compile=False)  # eager flex: same kernel semantics, no compile time in the test
    x = tokens(m)
    with torch.no_grad():
        out = m(x)
        ref = reference_attention(m, x, m.dense_mask(x.device))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_compiled_flex_equals_masked_attention_and_tiles_equal_raster():
    raster = make("flex", grid=(12, 12), kernel=5, tile=None)
    tiled = make("flex", grid=(12, 12), kernel=5, tile=(4, 8))
    tiled.load_state_dict(raster.state_dict())
    x = tokens(raster, batch=1)
    with torch.no_grad():
        a, b = raster(x), tiled(x)
        ref = reference_attention(raster, x, raster.dense_mask(x.device))
    assert tiled.flex_plan(x.device)[0] is not None  # the tiled module really reorders
    torch.testing.assert_close(a, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0)


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no CPU backward in this torch; checked on a GPU")
def test_flex_gradients_equal_sdpa_on_cuda():
    m = make("flex", grid=(16, 16), kernel=5, tile=(4, 32)).cuda()
    x = tokens(m).cuda().requires_grad_(True)
    out = m(x)
    m.backend = "sdpa_mask"
    x2 = x.detach().clone().requires_grad_(True)
    ref = m(x2)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    for a, b in zip(grads, torch.autograd.grad(ref, [x2, *m.parameters()], g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel,border", [(7, "shift"), (11, "clip"), (9, "shift")])
def test_kernel_covering_the_image_is_global_attention(kernel, border):
    torch.manual_seed(0)
    full = Attention(32, num_heads=2, qkv_bias=True).eval()
    local = LocalAttention(32, num_heads=2, qkv_bias=True, kernel=kernel, grid_size=6, num_prefix_tokens=1,
                           border=border, backend="sdpa_mask").eval()
    local.load_state_dict(full.state_dict())  # same parameter names, key for key
    x = torch.randn(2, 37, 32)
    assert neighbourhood_mask(6, 6, kernel, 1, border).all()
    torch.testing.assert_close(local(x), full(x), atol=ATOL, rtol=0)


def test_token_count_mismatch_is_a_clear_value_error():
    m = make("sdpa_mask", grid=(6, 6), prefix=1)
    with pytest.raises(ValueError, match=r"got 10 tokens but its grid is 6x6 with 1 prefix token\(s\) = 37"):
        m(torch.randn(2, 10, 32))  # e.g. MAE's kept 25 % of the tokens
    with pytest.raises(ValueError, match="attn_mask"):
        m(torch.randn(2, 37, 32), attn_mask=torch.ones(37, 37, dtype=torch.bool))


def test_gradients_reach_every_parameter():
    extra = {"gated": True} if "gated" in inspect.signature(Attention).parameters else {}  # timm >= 1.0.30
    m = LocalAttention(32, num_heads=2, kernel=3, grid_size=(5, 4), num_prefix_tokens=1, qkv_bias=True,
                       qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm, backend="auto", **extra).train()
    m(torch.randn(2, 21, 32)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_auto_backend_rule_on_cpu():
    m = make("auto", grid=(48, 48), kernel=7, prefix=0)
    x = torch.randn(1, m.num_tokens, 32)
    assert m.resolve_backend(x) == "tiled"  # gradients needed: no CPU flex backward, the linear-cost path
    with torch.no_grad():
        assert m.resolve_backend(x) == "tiled"  # inference too: 4x faster than compiled flex on CPU
        assert m.resolve_backend(x.to("meta")) == "tiled"  # FLOP counting sees the linear path
    small = make("auto")
    with torch.no_grad():
        assert small.resolve_backend(tokens(small)) == "tiled"
    strict = make("flex")
    with pytest.raises(RuntimeError, match="no FlexAttention backward on CPU"):
        strict(tokens(strict))


def test_timm_block_takes_the_layer_and_keeps_timm_keys():
    layer = local_attention_layer(kernel=3, grid_size=4, num_prefix_tokens=1, backend="sdpa_mask")
    torch.manual_seed(0)
    block = Block(32, 2, qkv_bias=True, qk_norm=True, attn_layer=layer)
    plain = Block(32, 2, qkv_bias=True, qk_norm=True)
    assert isinstance(block.attn, LocalAttention) and block.attn.kernel == (3, 3)
    assert block.state_dict().keys() == plain.state_dict().keys()
    block.load_state_dict(plain.state_dict())
    assert block(torch.randn(2, 17, 32)).shape == (2, 17, 32)
    with pytest.raises(TypeError, match="unknown arguments"):
        local_attention_layer(kernal=3)
