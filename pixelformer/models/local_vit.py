"""Local-attention pixel transformer (``pit_local_*``): a PiT whose blocks attend to a k x k pixel neighbourhood.

Why neighbourhoods and not shifted windows: a neighbourhood (NAT, Hassani et al., arXiv 2204.07143) is the same for
every pixel, so no pixel sits on a window edge, no layer has to alternate a shift, and the receptive field grows by
k - 1 pixels per block whatever the image size; with border "shift" every query sees exactly k * k keys. The CLS
token (when the model has one) attends to every pixel and every pixel to it: one global token per block that carries
image-wide context, as the prefix tokens of :class:`~pixelformer.layers.LocalAttention` do. ``global_layers`` keeps
chosen blocks global (attention over all pixels) for models that need more.

Everything else is the PiT (:class:`~pixelformer.models.VisionTransformer`): the same parameters, names and
initialisation (a pit_* checkpoint loads into the pit_local_* of the same size and back), the same pooling, head and
position tables. The attention kernel is chosen per call by ``LocalAttention`` (FlexAttention on a GPU, plain tiled
attention for CPU training; see its docstring).

Contract parts (:mod:`pixelformer.models.backbone`): classify, dense, conditioning, intermediates, attention_maps,
resize, train_size. Not ``masking`` or ``token_drop``: a neighbourhood is defined on the whole pixel grid, so MAE's encoder, which sees a random
quarter of the pixels, is refused (as is ``patch_drop_rate``).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..layers import LocalAttention
from ._registry import register_backbone
from .backbone import PARTS
from .vision_transformer import MODEL_SIZES, VisionTransformer

__all__ = ["LocalVisionTransformer", "LOCAL_SIZES"]


class LocalVisionTransformer(VisionTransformer):
    """:class:`VisionTransformer` with :class:`~pixelformer.layers.LocalAttention` in its blocks.

    Args:
        kernel: Neighbourhood side k (odd); k >= the grid side makes a block global.
        global_layers: Indices of blocks that keep global attention (e.g. ``(depth - 1,)``).
        attn_backend: ``LocalAttention``'s backend: ``auto`` (default), ``flex``, ``tiled`` or ``sdpa_mask``.
        **kwargs: Those of :class:`VisionTransformer` (``patch_size`` any, ``patch_drop_rate`` must stay 0).
    """

    supports = frozenset(PARTS) - {"masking", "token_drop"}
    unsupported_reasons = {"masking": "its neighbourhood attention needs the whole pixel grid, and MAE's encoder sees "
                                      "only the visible pixels",
                           "token_drop": "its neighbourhood attention needs the whole pixel grid; train it at a lower "
                                         "resolution instead (recipe.low_res_scale)"}

    def __init__(self, kernel: int = 7, global_layers: Sequence[int] = (), attn_backend: str = "auto",
                 **kwargs: Any) -> None:
        if kwargs.get("patch_drop_rate"):
            raise ValueError("patch_drop_rate must be 0 for a local-attention model: its neighbourhoods need the "
                             "whole pixel grid")
        super().__init__(**kwargs)
        depth = len(self.blocks)
        bad = [i for i in global_layers if not -depth <= i < depth]
        if bad:
            raise ValueError(f"global_layers {list(global_layers)} name blocks outside 0..{depth - 1}")
        self.kernel, self.attn_backend = kernel, attn_backend
        self.global_layers = tuple(sorted({i % depth for i in global_layers}))
        grid = self.patch_embed.grid_size
        for i, block in enumerate(self.blocks):
            if i in self.global_layers:
                continue
            old = block.attn
            local = LocalAttention(
                old.qkv.in_features, old.num_heads, kernel=kernel, grid_size=grid,
                num_prefix_tokens=self.num_prefix_tokens, backend=attn_backend, qkv_bias=old.qkv.bias is not None,
                attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p)
            local.q_norm, local.k_norm, local.norm = old.q_norm, old.k_norm, old.norm  # qk_norm as the PiT's
            local.load_state_dict(old.state_dict())  # same parameters and names: the PiT's initialisation is kept
            block.attn = local

    def set_token_drop(self, rate: float) -> None:
        if rate:
            raise ValueError(self.unsupported_reasons["token_drop"])

    def _set_grid(self, grid: int) -> None:
        super()._set_grid(grid)
        for block in self.blocks:
            if isinstance(block.attn, LocalAttention):
                block.attn.set_grid_size(grid)


# (kernel, global layers) per registered size: 7 x 7 neighbourhoods, the CLS token as the only global path.
LOCAL_SIZES = {size: (7, ()) for size in ("mini", "tiny", "small", "base")}


def _make_entrypoint(size: str) -> None:
    depth, embed_dim, num_heads = MODEL_SIZES[size]
    kernel, global_layers = LOCAL_SIZES[size]
    defaults: dict[str, Any] = dict(patch_size=1, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                                    kernel=kernel, global_layers=global_layers)
    if size == "mini":
        defaults["pos_embed"] = "sincos"  # as pit_mini: a fixed table trains better within a CPU budget
    name = f"pit_local_{size}"

    def entrypoint(**kwargs: Any) -> LocalVisionTransformer:
        model = LocalVisionTransformer(**dict(defaults, **kwargs))
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "architecture": name}
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (f"PiT-Local-{size.capitalize()}: {depth} blocks x {embed_dim} wide x {num_heads} heads, "
                          f"pixel tokens, {kernel}x{kernel} neighbourhood attention, the CLS token global.")
    register_backbone(entrypoint)


for _size in LOCAL_SIZES:
    _make_entrypoint(_size)
