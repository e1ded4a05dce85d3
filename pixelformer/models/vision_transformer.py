"""Vision Transformer over pixel tokens (PiT, patch size 1) or patches (ViT): timm's ``VisionTransformer``,
subclassed only where pixels need something timm does not have.

Paper: D.-K. Nguyen et al., "An Image is Worth More Than 16x16 Patches: Exploring Transformers on Individual Pixels",
arXiv 2406.09415. A PiT is a plain ViT whose patch size is 1. The blocks, attention, MLP, pooling (``global_pool``),
``fc_norm``, register tokens, layer scale, qk-norm, patch dropout, ``forward_intermediates`` and ``group_matcher`` are
timm's; this subclass adds what pixels need: the int-sized :class:`~pixelformer.layers.PatchEmbed` with
``patchify`` / ``unpatchify`` (MAE, DiT), a fixed 2D sin-cos table that is computed rather than saved and checked on
load, a learned table resized on load at another resolution, the split embedding API MAE masks in
(``embed_patches`` -> mask -> ``prepend_prefix`` -> ``forward_tokens``) and the project's weight initialisation.

The backbone holds no training logic: losses, masking and noise live in ``tasks/``.
"""
from __future__ import annotations

import logging
import numbers
from functools import partial
from typing import Any, Literal, Optional

import torch
from timm.layers import PatchDropout, trunc_normal_
from timm.models import checkpoint_seq, group_parameters
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from ..layers import PatchEmbed, build_sincos_2d_pos_embed, init_transformer_weights, load_fixed_table, resize_pos_embed
from ._registry import register_backbone
from .backbone import PARTS, AttentionSite, TokenLayout, describe, run_block

__all__ = ["VisionTransformer", "MODEL_SIZES", "GLOBAL_POOLS", "default_pretrained_cfg"]

_logger = logging.getLogger(__name__)

PosEmbedKind = Literal["sincos", "learned", "none"]
PoolKind = Literal["cls", "mean"]
# timm's pooling choices offered here ('' = no pooling and 'prr' are not: a classifier needs a pooled vector).
GLOBAL_POOLS = ("token", "avg", "max", "avgmax", "map")
_POOL_TO_GLOBAL = {"cls": "token", "mean": "avg"}

# Normalisation recorded in ``pretrained_cfg`` when the data is not known: the registered sizes default to 32x32x3,
# CIFAR's format, so CIFAR-10's statistics; other channel counts map [0, 1] to [-1, 1].
# ``pixelformer.task.build_backbone`` replaces them by the statistics of the data a run trains on.
_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def default_pretrained_cfg(img_size: int, in_chans: int, num_classes: int,
                           mean: Optional[tuple[float, ...]] = None,
                           std: Optional[tuple[float, ...]] = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` for a model built at ``img_size`` x ``img_size`` x ``in_chans``.

    What ``timm.data.resolve_data_config({}, model=m)`` reads: the input size the model was built for (fixed: the
    position table has one row per token), no crop (the project evaluates whole images) and the normalisation.
    """
    if mean is None or std is None:
        mean, std = (_CIFAR10_MEAN, _CIFAR10_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    return dict(url="", input_size=(in_chans, img_size, img_size), fixed_input_size=True, interpolation="bicubic",
                crop_pct=1.0, crop_mode="center", mean=tuple(mean), std=tuple(std), num_classes=num_classes,
                pool_size=None, first_conv="patch_embed.proj", classifier="head")


def _check_sizes(**sizes: Any) -> None:
    """Sizes that torch would take without a word (``in_chans=0`` builds a model that no image fits) or fail on
    deep inside (``img_size=-8``, ``"8"``, ``8.5``): each must be a whole number (img_size / patch_size: or a
    pair of them), positive, except ``num_classes`` and ``depth`` (0: no head, no blocks)."""
    for key, value in sizes.items():
        values = list(value) if key in ("img_size", "patch_size") and isinstance(value, (tuple, list)) else [value]
        lowest = 0 if key in ("num_classes", "depth") else 1
        whole = len(values) in (1, 2) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
        if not whole or min(values) < lowest:
            kind = "a whole number" + (" (or a pair of them)" if key in ("img_size", "patch_size") else "")
            raise ValueError(f"{key} must be {kind} >= {lowest}, got {value!r}")


class VisionTransformer(TimmVisionTransformer):
    """ViT backbone with an optional linear head; patch size 1 makes it a pixel transformer.

    Implements every part of the backbone contract (:mod:`pixelformer.models.backbone`): classify, dense, masking
    (any subset of tokens runs through global attention), conditioning, intermediates, attention_maps, resize,
    token_drop, train_size.

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
        qk_norm: LayerNorm on queries and keys (per head) before attention.
        init_values: Layer scale: each residual branch is multiplied by a learned per-channel vector initialised to
            this value; ``None`` = no layer scale.
        pos_embed: ``learned`` (trainable, resized on a resolution change), ``sincos`` (fixed 2D table) or ``none``.
        pool: ``cls`` (CLS token) or ``mean`` (average of the patch tokens); shorthand for ``global_pool`` token / avg.
        global_pool: timm's pooling: ``token``, ``avg``, ``max``, ``avgmax`` or ``map`` (attention pooling).
            ``None`` follows ``pool`` (default ``cls``).
        class_token: Whether to prepend a CLS token; defaults to ``global_pool == "token"``.
        reg_tokens: Number of register tokens (prefix tokens besides the CLS token, never pooled).
        fc_norm: Normalise after pooling (``fc_norm``) instead of normalising every token before it (``norm``), as
            timm's ``global_pool="avg"`` and MAE's fine-tuned models do. ``None`` follows timm's rule: on for
            avg / max / avgmax, off otherwise. ``False`` with ``pool="mean"`` averages normalised tokens.
        norm_eps: LayerNorm epsilon of every norm (1e-6 in timm's ViT; checkpoints built with PyTorch's default
            1e-5 need 1e-5 to reproduce their features).
        drop_rate: Dropout after the position embedding, in the MLPs and attention output, and before the head.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, increasing linearly to this value over the blocks.
        patch_drop_rate: Fraction of patch tokens dropped at random in training (prefix tokens are kept).
        weight_init: ``"project"`` (the project's init, below) or ``"skip"`` (timm's meaning: the caller initialises
            every weight, as the DiT denoiser does; no random numbers are drawn for it here).
    """

    supports: frozenset[str] = frozenset(PARTS)

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
            qk_norm: bool = False,
            init_values: Optional[float] = None,
            pos_embed: PosEmbedKind = "learned",
            pool: Optional[PoolKind] = None,
            global_pool: Optional[str] = None,
            class_token: Optional[bool] = None,
            reg_tokens: int = 0,
            fc_norm: Optional[bool] = None,
            norm_eps: float = 1e-6,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            patch_drop_rate: float = 0.0,
            weight_init: Literal["project", "skip"] = "project",
    ) -> None:
        if pos_embed not in ("sincos", "learned", "none"):
            raise ValueError(f"pos_embed must be one of sincos, learned, none; got {pos_embed!r}")
        _check_sizes(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                     embed_dim=embed_dim, depth=depth)
        # numpy's integers (a size read from an array) as Python ints, which the patch embedding expects
        img_size, patch_size = (int(v) if isinstance(v, numbers.Integral) else v for v in (img_size, patch_size))
        global_pool = self._resolve_pool(pool, global_pool)
        if class_token is None:
            class_token = global_pool == "token"
        if global_pool == "token" and not class_token:
            raise ValueError("pool='cls' needs class_token=True: use pool='mean' for a model without a CLS token")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}: pick heads that "
                             f"divide it")
        if reg_tokens < 0 or not 0 <= patch_drop_rate < 1:
            raise ValueError(f"reg_tokens must be >= 0 and patch_drop_rate in [0, 1); got {reg_tokens}, "
                             f"{patch_drop_rate}")
        # Same random draws as the project's own model had: layers draw their default init at construction in the
        # same order (patch projection, then qkv, proj, fc1, fc2 per block, head), then _init_weights; timm's init
        # is skipped.
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, qk_norm=qk_norm, init_values=init_values, class_token=class_token,
            pos_embed="learn" if pos_embed == "learned" else "none", reg_tokens=reg_tokens, fc_norm=fc_norm,
            drop_rate=drop_rate, pos_drop_rate=drop_rate, proj_drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, patch_drop_rate=patch_drop_rate, weight_init="skip",
            embed_layer=PatchEmbed, norm_layer=partial(nn.LayerNorm, eps=norm_eps), act_layer=nn.GELU,
        )
        self.pos_embed_kind = pos_embed
        self.norm_eps = norm_eps
        if pos_embed == "sincos":
            # A fixed table is recomputed for any grid, so it is not saved in checkpoints.
            del self.pos_embed
            table = build_sincos_2d_pos_embed(embed_dim, self.patch_embed.grid_size, self.num_prefix_tokens)
            self.register_buffer("pos_embed", table, persistent=False)
        self.pretrained_cfg = self.default_cfg = default_pretrained_cfg(img_size, in_chans, num_classes)
        if weight_init not in ("project", "skip"):
            raise ValueError(f"weight_init must be 'project' or 'skip', got {weight_init!r}")
        if weight_init == "project":
            self._init_weights()

    @staticmethod
    def _resolve_pool(pool: Optional[str], global_pool: Optional[str]) -> str:
        """``pool`` (cls / mean, the config's historical key) and ``global_pool`` (timm's) -> timm's name."""
        if pool is not None and pool not in _POOL_TO_GLOBAL:
            raise ValueError(f"pool must be cls or mean; got {pool!r}")
        if global_pool is None:
            return _POOL_TO_GLOBAL[pool or "cls"]
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}; got {global_pool!r}")
        if pool is not None and _POOL_TO_GLOBAL[pool] != global_pool:
            raise ValueError(f"pool={pool!r} and global_pool={global_pool!r} disagree: set only one of them")
        return global_pool

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        """The project's init (kept, not timm's, so that committed results reproduce): the patch projection as a
        linear layer (xavier), trunc-normal .02 linear weights, zero biases, LayerNorm ones / zeros."""
        if isinstance(self.pos_embed, nn.Parameter):
            trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        init_transformer_weights(self, self.patch_embed.proj)
        if self.attn_pool is not None:  # global_pool=map: its latent query (timm's init)
            self.attn_pool.init_weights()

    # --------------------------------------------------------------- forward
    def _pos_table(self) -> Optional[torch.Tensor]:
        """The position table of the current grid: a learned table trained at another size (``set_train_size``) is
        resampled from its parameter in every forward, so gradients reach the one parameter the optimizer holds."""
        table, grid = self.pos_embed, self.patch_embed.grid_size
        if isinstance(table, nn.Parameter) and table.shape[1] != self.num_prefix_tokens + grid * grid:
            return resize_pos_embed(table, grid, self.num_prefix_tokens)
        return table

    def _add_pos(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) patch tokens + the patch rows of the position table."""
        table = self._pos_table()
        return x if table is None else x + table[:, self.num_prefix_tokens:]

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens with their position embedding, no prefix tokens yet.

        Kept apart from the blocks so that MAE can drop tokens in between.
        """
        return self._add_pos(self.patch_embed(x))

    def prepend_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, prefix + N, D): prepend the CLS and register tokens (with their position rows)."""
        prefix = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if not prefix:
            return x
        prefix = prefix[0] if len(prefix) == 1 else torch.cat(prefix, dim=1)  # (1, P, D)
        if self.pos_embed is not None:
            prefix = prefix + self.pos_embed[:, : self.num_prefix_tokens]  # prefix rows never resize
        return torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's hook (used by ``forward_intermediates``): positions and prefix tokens, then position dropout."""
        return self.pos_drop(self.prepend_prefix(self._add_pos(x)))

    def forward_tokens(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the blocks and the final norm (none with ``fc_norm``) on embedded tokens (B, T, D) -> (B, T, D);
        ``cond`` (B, D) modulates every block (after :func:`~pixelformer.models.backbone.condition_blocks`)."""
        x = self.norm_pre(self.pos_drop(x))
        if cond is not None:
            for block in self.blocks:
                x = run_block(block, x, cond)
        elif self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D) tokens, normalised unless the model normalises after pooling.

        With ``patch_drop_rate`` the training output has fewer patch tokens.
        """
        return self.forward_tokens(self.patch_drop(self.prepend_prefix(self.embed_patches(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes), or pooled features (B, D) when there is no head."""
        return self.forward_head(self.forward_features(x))

    # ----------------------------------------------------------- contract
    @property
    def img_size(self) -> int:
        return self.patch_embed.img_size

    def token_layout(self) -> TokenLayout:
        grid, p = self.patch_embed.grid_size, self.patch_embed.patch_size
        return TokenLayout(self.patch_embed.img_size, self.patch_embed.in_chans, p, (grid, grid),
                           self.num_prefix_tokens, (((grid, grid), p),))

    def attention_sites(self) -> list[AttentionSite]:
        grid, p = self.patch_embed.grid_size, self.patch_embed.patch_size
        return [AttentionSite(f"blocks.{i}.attn", b.attn, (grid, grid), p, self.num_prefix_tokens,
                              getattr(b.attn, "kernel", None)) for i, b in enumerate(self.blocks)]

    def condition_blocks(self) -> list[nn.Module]:
        """The blocks, in execution order, that conditioning modulates (all of them)."""
        return list(self.blocks)

    def describe(self, flops: bool = False) -> dict[str, Any]:
        return describe(self, flops)

    # ----------------------------------------------------------- utilities

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping, except that the final ``norm`` is not put with the last block: everything after
        the blocks (norm, fc_norm, attention pool, head) is unmatched, which timm makes one last group, so layer-wise
        decay has depth + 2 layers whichever of norm / fc_norm the model has (the project's decay ids)."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre", blocks=r"^blocks\.(\d+)")

    def layer_id(self, param_name: str) -> int:
        """Depth index of a parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest last."""
        layer_map = group_parameters(self, self.group_matcher(coarse=False), reverse=True)
        return layer_map.get(param_name, len(self.blocks) + 1)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new head with MAE's fine-tuning init (trunc-normal 2e-5, zero bias)."""
        super().reset_classifier(num_classes, global_pool)
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def set_input_size(self, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> None:
        """Change the input resolution in place, resizing a learned or recomputing a sin-cos position embedding."""
        self.patch_embed.set_input_size(img_size, patch_size)
        self._native_img_size = self.patch_embed.img_size
        self._set_grid(self.patch_embed.grid_size)
        if isinstance(self.pos_embed, nn.Parameter):
            grid = self.patch_embed.grid_size
            self.pos_embed = nn.Parameter(resize_pos_embed(self.pos_embed.data, grid, self.num_prefix_tokens))
        size = self.patch_embed.img_size
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg,
                                                  "input_size": (self.patch_embed.in_chans, size, size)}

    def set_train_size(self, img_size: Optional[int] = None) -> None:
        """Take ``img_size`` inputs from now on without replacing a parameter (``None``: back to the size the model
        was built or last resized for): a learned table stays at its size and is resampled in each forward, a sin-cos
        table is recomputed. Progressive resolution trains this way; the optimizer's state stays with its parameters.
        """
        native = getattr(self, "_native_img_size", None) or self.patch_embed.img_size
        self._native_img_size = native
        size = native if img_size is None else img_size
        if size != self.patch_embed.img_size:
            self.patch_embed.set_input_size(size)
            self._set_grid(self.patch_embed.grid_size)

    def _set_grid(self, grid: int) -> None:
        """Lay what depends on the token grid on ``grid`` (a sin-cos table; subclasses: attention neighbourhoods)."""
        if self.pos_embed is not None and not isinstance(self.pos_embed, nn.Parameter):
            table = build_sincos_2d_pos_embed(self.embed_dim, grid, self.num_prefix_tokens).to(self.pos_embed)
            self.register_buffer("pos_embed", table, persistent=False)

    def set_token_drop(self, rate: float) -> None:
        """Drop ``rate`` of the patch tokens of each image at random in training from now on (timm's
        ``PatchDropout``, prefix tokens kept; it draws from the process's training stream); 0 turns it off."""
        if not 0 <= rate < 1:
            raise ValueError(f"token drop rate must be in [0, 1), got {rate}")
        if isinstance(self.patch_drop, PatchDropout):
            self.patch_drop.prob = rate
        elif rate > 0:  # timm builds an Identity for patch_drop_rate=0
            self.patch_drop = PatchDropout(rate, num_prefix_tokens=self.num_prefix_tokens)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        if not prefix:
            _take_backbone_of_task_state(self, state_dict)
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


# Where a pixelformer task module keeps its backbone: Classifier.backbone (cls), MAEObjective.model.encoder (mae).
TASK_BACKBONE_PREFIXES = ("backbone.", "model.encoder.")


def _take_backbone_of_task_state(model: nn.Module, state_dict: dict) -> None:
    """A task module's state dict loaded into the bare backbone (``timm.create_model(..., checkpoint_path=<a
    pixelformer .ckpt>)``, ``backbone.load_state_dict(ckpt["model"])``): keep the backbone's keys, without their
    prefix, and nothing else (an MAE decoder). A state dict with backbone keys at the top level is left alone."""
    roots = {name.split(".")[0] for name in model.state_dict()}
    if any(k.split(".")[0] in roots for k in state_dict):
        return
    for task_prefix in TASK_BACKBONE_PREFIXES:
        found = {k[len(task_prefix):]: v for k, v in state_dict.items() if k.startswith(task_prefix)}
        if found:
            state_dict.clear()
            state_dict.update(found)
            return


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
_FAMILY_PATCH_SIZE = {"pit": 1, "vit": 2}


def _make_entrypoint(family: str, size: str) -> None:
    depth, embed_dim, num_heads = MODEL_SIZES[size]
    defaults: dict[str, Any] = dict(
        patch_size=_FAMILY_PATCH_SIZE[family], depth=depth, embed_dim=embed_dim, num_heads=num_heads,
    )
    if size == "mini":
        # On small data a learned embedding under-trains within a CPU budget; the fixed 2D table does not.
        defaults["pos_embed"] = "sincos"
    name = f"{family}_{size}"

    def entrypoint(**kwargs: Any) -> VisionTransformer:
        if family == "pit" and kwargs.get("patch_size", 1) != 1:
            raise ValueError(f"{name} is a pixel transformer (patch_size=1); use vit_{size} for patches")
        model = VisionTransformer(**dict(defaults, **kwargs))
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, "architecture": name}
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = (
        f"{family.upper()}-{size.capitalize()}: {depth} blocks x {embed_dim} wide x {num_heads} heads, "
        f"patch size {_FAMILY_PATCH_SIZE[family]} by default."
    )
    register_backbone(entrypoint)


for _family in _FAMILY_PATCH_SIZE:
    for _size in MODEL_SIZES:
        _make_entrypoint(_family, _size)
