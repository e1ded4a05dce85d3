"""Vision Transformer over pixel tokens (PiT, patch size 1) or patches (ViT), one class for both families.

Paper: D.-K. Nguyen et al., "An Image is Worth More Than 16x16 Patches: Exploring Transformers on Individual Pixels",
arXiv 2406.09415. A PiT is a plain ViT whose patch size is 1: each pixel is projected linearly to a token, a
position embedding is added (learned in the paper's main setting; sin-cos and none are its ablations) and a stack of
pre-norm blocks follows. Parameter names follow timm's ``VisionTransformer`` so checkpoints interchange.

The backbone holds no training logic: losses, masking and noise live in ``tasks/``.
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block, PatchEmbed, build_sincos_2d_pos_embed, load_fixed_table, resize_pos_embed
from ._registry import register_backbone

__all__ = ["VisionTransformer", "MODEL_SIZES"]

_logger = logging.getLogger(__name__)

PosEmbedKind = Literal["sincos", "learned", "none"]
PoolKind = Literal["cls", "mean"]


class VisionTransformer(nn.Module):
    """ViT backbone with an optional linear head; patch size 1 makes it a pixel transformer.

    Args:
        img_size: Square input size.
        patch_size: Patch side; 1 = one token per pixel.
        in_chans: Input channels.
        num_classes: Size of the linear head; 0 means none (``forward`` returns pooled features).
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        qkv_bias: Bias on the qkv projection.
        pos_embed: ``learned`` (trainable, resized on a resolution change), ``sincos`` (fixed 2D table) or ``none``.
        pool: ``cls`` (CLS token) or ``mean`` (average of the patch tokens).
        class_token: Whether to prepend a CLS token; defaults to ``pool == "cls"``.
        fc_norm: Normalise after pooling (``fc_norm``) instead of normalising every token before it (``norm``), as
            timm's ``global_pool="avg"`` and MAE's fine-tuned models do. ``None`` follows timm's rule: on for
            ``pool="mean"``, off for ``pool="cls"``. ``False`` with ``pool="mean"`` averages normalised tokens.
        norm_eps: LayerNorm epsilon of every norm (1e-6 in timm's ViT; checkpoints built with PyTorch's default
            1e-5 need 1e-5 to reproduce their features).
        drop_rate: Dropout after the position embedding, in the MLPs and before the head.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, increasing linearly to this value over the blocks.
    """

    def __init__(
            self,
            img_size: int = 32,
            patch_size: int = 1,
            in_chans: int = 3,
            num_classes: int = 0,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            pos_embed: PosEmbedKind = "learned",
            pool: PoolKind = "cls",
            class_token: bool | None = None,
            fc_norm: bool | None = None,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed must be one of sincos, learned, none; got {pos_embed!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be cls or mean; got {pool!r}")
        if class_token is None:
            class_token = pool == "cls"
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True: use pool='mean' for a model without a CLS token")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        use_fc_norm = pool == "mean" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.pos_embed_kind = pos_embed
        self.pool = pool
        self.norm_eps = norm_eps
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        num_pos = self.num_prefix_tokens + self.patch_embed.num_patches
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim))
        elif pos_embed == "sincos":
            # A fixed table is recomputed for any grid, so it is not saved in checkpoints.
            table = build_sincos_2d_pos_embed(embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens)
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # plain floats: buildable on meta
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)
        ])
        # timm's layout: one of the two is a LayerNorm, the other an Identity (no parameters, no checkpoint keys).
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        # The patch projection is a linear layer in disguise: init it as one (MAE does the same).
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --------------------------------------------------------------- forward
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens with their position embedding, no prefix tokens yet.

        Kept apart from the blocks so that MAE can drop tokens in between.
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, self.num_prefix_tokens:]
        return x

    def prepend_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, prefix + N, D): prepend the CLS token (with its own position embedding)."""
        if self.cls_token is None:
            return x
        cls = self.cls_token
        if self.pos_embed is not None:
            cls = cls + self.pos_embed[:, : self.num_prefix_tokens]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks and the final norm (none with ``fc_norm``) on embedded tokens (B, T, D) -> (B, T, D)."""
        x = self.pos_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D) tokens, normalised unless the model normalises after pooling."""
        return self.forward_tokens(self.prepend_prefix(self.embed_patches(x)))

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + N, D) -> (B, D): the CLS token, or the mean of the patch tokens."""
        if self.pool == "cls":
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, prefix + N, D) tokens -> logits (B, num_classes), or the pooled, normalised features (B, D)."""
        x = self.head_drop(self.fc_norm(self.pool_tokens(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes), or pooled features (B, D) when there is no head."""
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------- utilities
    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (besides biases and norms)."""
        return {"pos_embed", "cls_token"}

    def layer_id(self, param_name: str) -> int:
        """Depth index of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest last."""
        if param_name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if param_name.startswith("blocks."):
            return int(param_name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (memory for compute)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    def set_input_size(self, img_size: int) -> None:
        """Change the input resolution in place, resizing a learned or recomputing a sin-cos position embedding."""
        old_pe = self.patch_embed
        new_pe = PatchEmbed(img_size, old_pe.patch_size, old_pe.in_chans, self.embed_dim).to(old_pe.proj.weight)
        new_pe.proj = old_pe.proj
        self.patch_embed = new_pe
        grid = new_pe.grid_size
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, self.num_prefix_tokens))
        elif self.pos_embed is not None:
            table = build_sincos_2d_pos_embed(self.embed_dim, grid, self.num_prefix_tokens).to(self.pos_embed)
            self.register_buffer("pos_embed", table, persistent=False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # A saved copy of a fixed table is checked against the model's, never dropped unseen.
        load_fixed_table(self, "pos_embed", state_dict, prefix, error_msgs)
        # A learned position embedding saved at another resolution is resized on load, so a checkpoint trained at
        # one image size can be evaluated or fine-tuned at another.
        key = prefix + "pos_embed"
        if isinstance(self.pos_embed, nn.Parameter) and key in state_dict:
            saved = state_dict[key]
            if saved.ndim == 3 and saved.shape != self.pos_embed.shape and saved.shape[-1] == self.embed_dim:
                grid = self.patch_embed.grid_size
                _logger.info("resizing pos_embed %s -> %s", tuple(saved.shape), tuple(self.pos_embed.shape))
                state_dict[key] = resize_pos_embed(saved, grid, self.num_prefix_tokens)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# ---------------------------------------------------------------------------------------------- registered sizes
# (depth, embed_dim, num_heads). Standard ViT widths; "mini" is a CPU-sized model for small data such as digits.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "mini": (4, 64, 4),
    "tiny": (12, 192, 3),
    "small": (12, 384, 6),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
    "huge": (32, 1280, 16),
}
# PiT: one token per pixel. ViT: patch 2 at 32x32, the paper's ViT comparison point; any patch size can be passed.
FAMILY_PATCH_SIZE = {"pit": 1, "vit": 2}


def _make_entrypoint(family: str, size: str) -> None:
    depth, embed_dim, num_heads = MODEL_SIZES[size]
    defaults: dict[str, Any] = dict(
        patch_size=FAMILY_PATCH_SIZE[family], depth=depth, embed_dim=embed_dim, num_heads=num_heads,
    )
    if size == "mini":
        # On small data a learned embedding under-trains within a CPU budget; the fixed 2D table does not.
        defaults["pos_embed"] = "sincos"

    def entrypoint(**kwargs: Any) -> VisionTransformer:
        if family == "pit" and kwargs.get("patch_size", 1) != 1:
            raise ValueError(f"{family}_{size} is a pixel transformer (patch_size=1); use vit_{size} for patches")
        return VisionTransformer(**dict(defaults, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = f"{family}_{size}"
    entrypoint.__doc__ = (
        f"{family.upper()}-{size.capitalize()}: {depth} blocks x {embed_dim} wide x {num_heads} heads, "
        f"patch size {FAMILY_PATCH_SIZE[family]} by default."
    )
    register_backbone(entrypoint)


for _family in FAMILY_PATCH_SIZE:
    for _size in MODEL_SIZES:
        _make_entrypoint(_family, _size)
