"""Hourglass pixel transformer (``pit_hourglass_*``): local attention on pixels, global attention on merged tokens,
and the way back up to pixels with skip connections.

After HDiT (Crowson et al., "Scalable High-Resolution Pixel-Space Image Synthesis with Hourglass Diffusion
Transformers", arXiv 2401.11605): the pixel level (and any intermediate level) runs neighbourhood attention, whose cost
is linear in the pixel count; ``f x f`` groups of tokens are merged (concatenated, then projected) into one token of
the next level; the coarsest level runs global attention over few tokens; the way up splits each token back into
``f x f`` (projected, then un-shuffled) and mixes in the tokens of the same level on the way down with a learned
interpolation (HDiT's lerp skip). The output is one token per pixel, in raster order, like a PiT's, so every task reads
it the same way: ``cls`` pools it, DiT predicts each pixel's noise from it.

With ``depths=(1, 2)`` and ``factors=(4,)`` (``pit_hourglass_mini``) a 28x28 image runs one local block on 784 pixel
tokens, two global blocks on 49 merged tokens and one local block back on the pixels: 4 blocks of 64 wide, the
depth and width of ``pit_mini``. More levels (``depths=(2, 2, 4), factors=(2, 2)``: HDiT's 2x2 merges) are a
config away.

Contract parts (:mod:`pixelformer.models.backbone`): classify, dense, conditioning, intermediates (one NCHW map per
block, at its level's grid), attention_maps (each block's attention on its own level's grid), resize (to sides
divisible by the product of the factors), train_size (the same sides). Not ``masking`` or ``token_drop``: merging
needs every token of each group, and MAE's encoder sees only the visible pixels.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Optional, Sequence, Union

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block
from torch import nn

from ..layers import (LocalAttention, PatchEmbed, build_sincos_2d_pos_embed, init_transformer_weights, load_fixed_table,
                      local_attention_layer, resize_pos_embed)
from ._registry import register_backbone
from .backbone import PARTS, AttentionSite, TokenLayout, describe, run_block
from .vision_transformer import MODEL_SIZES, _check_sizes, _take_backbone_of_task_state, default_pretrained_cfg

__all__ = ["HourglassTransformer", "HOURGLASS_SIZES", "TokenMerge", "TokenSplit"]

_logger = logging.getLogger(__name__)


class TokenMerge(nn.Module):
    """(B, H * W, D) tokens on an (H, W) grid -> (B, H/f * W/f, D): each f x f group concatenated, then projected."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim * factor * factor, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (h, w), f, (b, _, d) = grid, self.factor, x.shape
        x = x.reshape(b, h // f, f, w // f, f, d).permute(0, 1, 3, 2, 4, 5)  # (B, h/f, w/f, f, f, D)
        return self.proj(x.reshape(b, (h // f) * (w // f), f * f * d))


class TokenSplit(nn.Module):
    """(B, h * w, D) coarse tokens -> (B, h*f * w*f, D): each projected to f x f tokens, then mixed with the same
    level's tokens from the way down, ``lerp(skip, up, fac)`` with a learned ``fac`` (HDiT's skip)."""

    def __init__(self, dim: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(dim, dim * factor * factor)
        self.fac = nn.Parameter(torch.full((), 0.5))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (h, w), f, (b, _, d) = grid, self.factor, x.shape  # grid: the coarse one
        x = self.proj(x).reshape(b, h, w, f, f, d).permute(0, 1, 3, 2, 4, 5)  # (B, h, f, w, f, D)
        up = x.reshape(b, h * f * w * f, d)
        # lerp written out: under autocast ``up`` is bf16 while ``skip`` may be fp32, and torch.lerp wants one dtype
        return skip + self.fac * (up - skip)


def _walk(depths: Sequence[int], up_depths: Sequence[int]) -> tuple[list[tuple[str, int, int]], list[int]]:
    """The hourglass's plan, ``(kind, index, level)`` steps of kind block / merge / split, and each block's level.

    Blocks are numbered in execution order (down levels, the global level, up levels), so that names, layer decay,
    FSDP and the analysis see one sequence as in a ViT; the plan says where each sits."""
    plan: list[tuple[str, int, int]] = []
    levels: list[int] = []

    def add_blocks(level: int, count: int) -> None:
        for _ in range(count):
            plan.append(("block", len(levels), level))
            levels.append(level)

    for level, d in enumerate(depths[:-1]):
        add_blocks(level, d)
        plan.append(("merge", level, level))
    add_blocks(len(depths) - 1, depths[-1])
    for level in reversed(range(len(depths) - 1)):
        plan.append(("split", level, level))
        add_blocks(level, up_depths[level])
    return plan, levels


class HourglassTransformer(nn.Module):
    """Pixel-level local attention, merged-token global attention, and back up (see the module docstring).

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm,
        init_values, norm_eps, drop_rate, attn_drop_rate, drop_path_rate: as :class:`VisionTransformer`.
        depths: Blocks per level, the pixel level first; the last level is the global one. Levels before it run
            ``depths[i]`` blocks on the way down and ``up_depths[i]`` (default: as many) on the way up.
        factors: Merge factor between level i and i + 1 (``len(depths) - 1`` of them).
        kernel: Neighbourhood side of the local levels.
        pos_embed: ``learned``, ``sincos`` or ``none``: the table added to the pixel tokens.
        pool / global_pool / class_token / reg_tokens: only mean pooling without prefix tokens exists here (the
            keywords are taken so that every task can pass the values it passes to a ViT).
        fc_norm: Normalise after pooling (default) instead of every token before it.
        attn_backend: ``LocalAttention``'s backend (``auto``: flex on a GPU, tiled for CPU training).
        weight_init: ``project`` (trunc-normal .02 linear layers, as the PiT) or ``skip`` (the caller initialises).
    """

    supports = frozenset(PARTS) - {"masking", "token_drop"}
    unsupported_reasons = {"masking": "merging needs every token of each group, and MAE's encoder sees only the "
                                      "visible pixels",
                           "token_drop": "merging needs every token of each group; train it at a lower resolution "
                                         "instead (recipe.low_res_scale)"}

    def __init__(self, img_size: int = 32, patch_size: int = 1, in_chans: int = 3, num_classes: int = 0,
                 embed_dim: int = 192, depths: Sequence[int] = (2, 2, 4), factors: Sequence[int] = (2, 2),
                 num_heads: int = 3, mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_norm: bool = False,
                 init_values: Optional[float] = None, kernel: int = 7, pos_embed: str = "learned",
                 pool: Optional[str] = None, global_pool: Optional[str] = None, class_token: Optional[bool] = None,
                 reg_tokens: int = 0, fc_norm: Optional[bool] = None, norm_eps: float = 1e-6, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, patch_drop_rate: float = 0.0,
                 attn_backend: str = "auto", weight_init: str = "project", depth: Optional[int] = None,
                 up_depths: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        _check_sizes(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                     embed_dim=embed_dim)
        depths, factors = tuple(int(d) for d in depths), tuple(int(f) for f in factors)
        up_depths = depths[:-1] if up_depths is None else tuple(int(d) for d in up_depths)
        if len(factors) != len(depths) - 1 or not depths or (factors and min(factors) < 2) or \
                min(depths[:-1], default=1) < 1 or depths[-1] < 0 or len(up_depths) != len(factors) or \
                min(up_depths, default=0) < 0:
            raise ValueError(f"depths {depths} and factors {factors}: give one factor >= 2 per level after the "
                             f"first and at least one block per local level (the global level may have none)")
        if depth is not None and depth != sum(depths) + sum(up_depths):  # a caller that sized both
            raise ValueError(f"depth={depth} does not fit the hourglass: its depths {depths} give "
                             f"{sum(depths) + sum(up_depths)} blocks (set model.depths instead)")
        if pool not in (None, "mean") or global_pool not in (None, "avg") or class_token or reg_tokens:
            raise ValueError("the hourglass pools the mean of its pixel tokens and has no CLS or register tokens: "
                             "use pool=mean (global_pool=avg), class_token=false, reg_tokens=0")
        if patch_drop_rate:
            raise ValueError("patch_drop_rate must be 0 for the hourglass: merging needs every token of each group")
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed must be one of sincos, learned, none; got {pos_embed!r}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: pick heads that "
                             f"divide it")
        img_size, patch_size = int(img_size), int(patch_size)
        self.depths, self.up_depths, self.factors, self.kernel = depths, up_depths, factors, kernel
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.num_classes, self.num_prefix_tokens, self.global_pool = num_classes, 0, "avg"
        self.pos_embed_kind, self.norm_eps, self.grad_checkpointing = pos_embed, norm_eps, False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self._check_grid(self.patch_embed.grid_size)
        grid = self.patch_embed.grid_size
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, embed_dim))
        elif pos_embed == "sincos":
            self.register_buffer("pos_embed", build_sincos_2d_pos_embed(embed_dim, grid), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self._plan, levels = _walk(depths, up_depths)
        count = len(levels)
        rates = [drop_path_rate * i / max(count - 1, 1) for i in range(count)]  # linear, as timm's
        blocks = []
        for i, level in enumerate(levels):
            attn = {}
            if level < len(depths) - 1:  # local levels; the last one is global
                attn["attn_layer"] = local_attention_layer(kernel=kernel, grid_size=self.level_grid(level),
                                                           backend=attn_backend)
            blocks.append(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                                init_values=init_values, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                                drop_path=rates[i], norm_layer=norm_layer, **attn))
        self.blocks = nn.Sequential(*blocks)
        self.merges = nn.ModuleList([TokenMerge(embed_dim, f) for f in factors])
        self.splits = nn.ModuleList([TokenSplit(embed_dim, f) for f in factors])
        use_fc_norm = True if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = self.default_cfg = default_pretrained_cfg(img_size, in_chans, num_classes)
        if weight_init not in ("project", "skip"):
            raise ValueError(f"weight_init must be 'project' or 'skip', got {weight_init!r}")
        if weight_init == "project":
            self._init_weights()

    def _check_grid(self, grid: int) -> None:
        step = math.prod(self.factors)
        if grid % step:
            raise ValueError(f"the hourglass merges {' x '.join(map(str, self.factors))} token groups, so the token "
                             f"grid ({grid}) must be divisible by {step}: pick an image size that is a multiple of "
                             f"{step * self.patch_embed.patch_size}")

    def level_grid(self, level: int) -> tuple[int, int]:
        side = self.patch_embed.grid_size // math.prod(self.factors[:level])
        return side, side

    def _init_weights(self) -> None:
        """As the PiT: trunc-normal .02 linear weights, zero biases, the patch projection xavier as a linear layer."""
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        init_transformer_weights(self, self.patch_embed.proj)

    # ------------------------------------------------------------------------------------------------ forward
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) pixel tokens with their position embedding."""
        x = self.patch_embed(x)
        table, grid = self.pos_embed, self.patch_embed.grid_size
        if isinstance(table, nn.Parameter) and table.shape[1] != grid * grid:  # set_train_size: resampled per forward
            table = resize_pos_embed(table, grid, 0)
        return x if table is None else x + table

    def prepend_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return x  # no prefix tokens

    def _run(self, x: torch.Tensor, cond: Optional[torch.Tensor], visit: Any = None,
             last: Optional[int] = None) -> torch.Tensor:
        """Walk the plan on pixel tokens (B, N, D); ``visit(i, x, grid)`` after block i; stop after block ``last``."""
        skips = []
        for kind, index, level in self._plan:
            if kind == "merge":
                skips.append(x)
                x = self.merges[index](x, self.level_grid(level))
            elif kind == "split":
                x = self.splits[index](x, skips.pop(), self.level_grid(level + 1))
            else:
                block = self.blocks[index]
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(run_block, block, x, cond)
                else:
                    x = run_block(block, x, cond)
                if visit is not None:
                    visit(index, x, self.level_grid(level))
                if last is not None and index >= last:
                    break
        return x

    def forward_tokens(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pixel tokens (B, N, D) -> (B, N, D) through every level and back; ``cond`` (B, D) modulates every block
        (after :func:`~pixelformer.models.backbone.condition_blocks`)."""
        if x.shape[1] != self.patch_embed.num_patches:
            raise ValueError(f"the hourglass needs all {self.patch_embed.num_patches} pixel tokens, got {x.shape[1]}")
        return self.norm(self._run(self.pos_drop(x), cond))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(self.embed_patches(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, **unused: Any) -> Any:
        """timm's semantics: the outputs of the blocks ``indices`` (last n if an int, all if None), each at its
        level's grid, NCHW (B, D, h, w) or NLC (B, h * w, D); with the final features unless ``intermediates_only``.
        ``norm`` applies the final norm to each."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        found: list[torch.Tensor] = []

        def visit(i: int, tokens: torch.Tensor, grid: tuple[int, int]) -> None:
            if i in take:
                y = self.norm(tokens) if norm else tokens
                found.append(y.reshape(len(y), *grid, -1).permute(0, 3, 1, 2).contiguous()
                             if output_fmt == "NCHW" else y)

        tokens = self._run(self.pos_drop(self.embed_patches(x)), None, visit,
                           last=max_index if (stop_early or intermediates_only) else None)
        if intermediates_only:
            return found
        return self.norm(tokens), found

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's API; nothing is pruned (later blocks feed the way up), the indices are returned."""
        take, _ = feature_take_indices(len(self.blocks), indices)
        if prune_head:
            self.reset_classifier(0)
        return take

    # ------------------------------------------------------------------------------------------------ contract
    def token_layout(self) -> TokenLayout:
        p, grid = self.patch_embed.patch_size, self.patch_embed.grid_size
        levels = tuple((self.level_grid(lv), p * math.prod(self.factors[:lv])) for lv in range(len(self.depths)))
        return TokenLayout(self.patch_embed.img_size, self.patch_embed.in_chans, p, (grid, grid), 0, levels)

    def attention_sites(self) -> list[AttentionSite]:
        p = self.patch_embed.patch_size
        return [AttentionSite(f"blocks.{index}.attn", self.blocks[index].attn, self.level_grid(level),
                              p * math.prod(self.factors[:level]), 0, getattr(self.blocks[index].attn, "kernel", None))
                for kind, index, level in self._plan if kind == "block"]

    def condition_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def describe(self, flops: bool = False) -> dict[str, Any]:
        return describe(self, flops)

    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size

    def set_input_size(self, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> None:
        """Change the input resolution in place: the position table resized (learned) or recomputed (sin-cos), each
        local level's neighbourhoods laid on its new grid."""
        old = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size, patch_size)
        try:
            self._check_grid(self.patch_embed.grid_size)
        except ValueError:
            self.patch_embed.set_input_size(old * self.patch_embed.patch_size)
            raise
        grid = self.patch_embed.grid_size
        self._native_img_size = self.patch_embed.img_size
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, 0))
        self._set_grid()
        size = self.patch_embed.img_size
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg,
                                                  "input_size": (self.patch_embed.in_chans, size, size)}

    def set_train_size(self, img_size: Optional[int] = None) -> None:
        """Take ``img_size`` inputs without replacing a parameter (``None``: back to the built size): a learned table is
        resampled in each forward, a sin-cos table recomputed, each local level laid on its new grid (progressive
        resolution; the optimizer's state stays with its parameters)."""
        native = getattr(self, "_native_img_size", None) or self.patch_embed.img_size
        self._native_img_size = native
        size = native if img_size is None else img_size
        if size == self.patch_embed.img_size:
            return
        old = self.patch_embed.grid_size
        self.patch_embed.set_input_size(size)
        try:
            self._check_grid(self.patch_embed.grid_size)
        except ValueError:
            self.patch_embed.set_input_size(old * self.patch_embed.patch_size)
            raise
        self._set_grid()

    def set_token_drop(self, rate: float) -> None:
        if rate:
            raise ValueError(self.unsupported_reasons["token_drop"])

    def _set_grid(self) -> None:
        """A sin-cos table and every local level's neighbourhoods on the current grid."""
        grid = self.patch_embed.grid_size
        if self.pos_embed is not None and not isinstance(self.pos_embed, nn.Parameter):
            table = build_sincos_2d_pos_embed(self.embed_dim, grid).to(self.pos_embed)
            self.register_buffer("pos_embed", table, persistent=False)
        for kind, index, level in self._plan:
            if kind == "block" and isinstance(self.blocks[index].attn, LocalAttention):
                self.blocks[index].attn.set_grid_size(self.level_grid(level))

    # ------------------------------------------------------------------------------------------------ timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer decay groups: embeddings, then the blocks in execution order (merges and splits with the block
        before them), then everything after."""
        return dict(stem=r"^pos_embed|patch_embed", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head with MAE's fine-tuning init (trunc-normal 2e-5, zero bias), as the ViT's."""
        if global_pool not in (None, "avg"):
            raise ValueError("the hourglass pools the mean of its tokens (global_pool='avg')")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes else nn.Identity()
        if num_classes:
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        if not prefix:
            _take_backbone_of_task_state(self, state_dict)
        load_fixed_table(self, "pos_embed", state_dict, prefix, error_msgs)  # checked, never dropped unseen
        key = prefix + "pos_embed"
        if isinstance(self.pos_embed, nn.Parameter) and key in state_dict:
            saved = state_dict[key]
            if saved.ndim == 3 and saved.shape != self.pos_embed.shape and saved.shape[-1] == self.embed_dim:
                grid = self.patch_embed.grid_size
                _logger.info("resizing pos_embed %s -> %s", tuple(saved.shape), tuple(self.pos_embed.shape))
                state_dict[key] = resize_pos_embed(saved, grid, 0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def two_level_depths(depth: int) -> tuple[tuple[int, int], tuple[int]]:
    """``depth`` blocks on two levels as (depths, up_depths): a sixth of them on the pixels each way (at least one),
    the rest on the merged tokens; pit_mini's 4 -> (1, 2) + (1,), pit_tiny's 12 -> (2, 8) + (2,); a 1-block model
    (tests) has its one block on the pixels and none back up."""
    if depth < 1:
        raise ValueError(f"an hourglass needs at least 1 block, got depth={depth}")
    if depth == 1:
        return (1, 0), (0,)
    local = max(1, depth // 6)
    return (local, depth - 2 * local), (local,)


# Registered sizes: the PiT of the same name's depth, width and heads, on two levels: 7x7 local attention on the
# pixels, then 4x4 pixels merged into one token for global attention (49 tokens at 28x28, 1,024 at 128x128).
HOURGLASS_SIZES = ("mini", "tiny", "small", "base")
HOURGLASS_FACTOR = 4


def _make_entrypoint(size: str) -> None:
    depth, embed_dim, num_heads = MODEL_SIZES[size]
    depths, _ = two_level_depths(depth)
    defaults: dict[str, Any] = dict(patch_size=1, depths=depths, factors=(HOURGLASS_FACTOR,), embed_dim=embed_dim,
                                    num_heads=num_heads, kernel=7)
    if size == "mini":
        defaults["pos_embed"] = "sincos"
    name = f"pit_hourglass_{size}"

    def entrypoint(**kwargs: Any) -> HourglassTransformer:
        if kwargs.get("depth") is not None and kwargs.get("depths") is None:  # model.depth: laid out on 2 levels
            kwargs["depths"], kwargs["up_depths"] = two_level_depths(int(kwargs["depth"]))
            kwargs["factors"] = kwargs.get("factors") or (HOURGLASS_FACTOR,)
        model = HourglassTransformer(**dict(defaults, **kwargs))
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "architecture": name}
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (f"PiT-Hourglass-{size.capitalize()}: {depth} blocks x {embed_dim} wide x {num_heads} heads, "
                          f"{depths[0]} local blocks (7x7) on the pixels each way, {depths[1]} global blocks on "
                          f"{HOURGLASS_FACTOR}x{HOURGLASS_FACTOR}-pixel tokens between them, skips across.")
    register_backbone(entrypoint)


for _size in HOURGLASS_SIZES:
    _make_entrypoint(_size)
