"""The backbone contract: what every registered backbone offers, and all that tasks, tools and benchmarks may use.

A backbone turns images into tokens, runs them, and turns them back into images or a pooled feature:

    images (B, C, H, W)
      -> embed_patches        (B, N, D)      N = grid_h * grid_w tokens at the input level, position added
      -> prepend_prefix       (B, P + N, D)  P prefix tokens (CLS, registers); a task may drop tokens before this
      -> forward_tokens(x, c) (B, P + N, D)  the blocks (and final norm); ``c`` (B, D) conditions every block
      -> forward_head         (B, classes) or the pooled feature (B, D) with ``pre_logits=True``
      -> patch_embed.unpatchify((B, N, p*p*C')) -> (B, C', H, W) for per-pixel outputs (MAE, DiT)

``forward_features(images)`` = the first three, ``forward(images)`` = all four. Whatever happens inside (local
windows, token merging between levels), the tokens that come out are the N input-level tokens in raster order, so
every task reads them the same way. The parts of the contract a family implements are named in ``supports``
(:data:`PARTS`); a task that needs a part a backbone lacks refuses the pair at config time with one line
(:func:`require`).

Conditioning (DiT) is added to any backbone by :func:`condition_blocks`: adaLN-Zero modulation wrapped around the
backbone's own timm-layout blocks (``norm1``, ``attn``, ``norm2``, ``mlp``), so a new family gets a DiT for free.
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import UserError

__all__ = ["PARTS", "AttentionSite", "Backbone", "TokenLayout", "condition_blocks", "count_flops", "describe",
           "modulate", "require", "run_block"]

#: The optional parts of the contract, and what a task does with each.
PARTS: dict[str, str] = {
    "classify": "forward_features + forward_head: a pooled feature and a linear head (cls, linprobe, k-NN)",
    "dense": "input-level tokens out of forward_tokens, unpatchified into per-pixel outputs (DiT, MAE's target)",
    "masking": "forward_tokens on any subset of the input-level tokens (MAE's encoder sees only the visible ones)",
    "conditioning": "condition_blocks + forward_tokens(x, cond): adaLN-Zero modulation by a vector (DiT)",
    "intermediates": "forward_intermediates with timm's semantics (features_only, probes)",
    "attention_maps": "attention_sites(): the attention modules and the grid their tokens sit on (analysis)",
    "resize": "set_input_size(img_size): the same weights at another resolution",
    "token_drop": "set_token_drop(rate): a random share of the input-level tokens dropped in training (recipe)",
    "train_size": "set_train_size(img_size): train at another resolution with the same parameter objects, so the "
                  "optimizer state stays with them (progressive resolution; None: back to the built size)",
}


@dataclass(frozen=True)
class TokenLayout:
    """Where a backbone's tokens sit. ``levels``: the token grid of every level, the input level first (one level
    for a plain ViT; a hierarchical model lists its coarser grids), with the input pixels per token side."""
    img_size: int
    in_chans: int
    patch_size: int
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    levels: tuple[tuple[tuple[int, int], int], ...]  # ((grid_h, grid_w), pixels per token side) per level

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def tokens(self) -> int:
        """Tokens per image at the input level, prefix included."""
        return self.num_prefix_tokens + self.num_patches


@dataclass(frozen=True)
class AttentionSite:
    """An attention module (timm ``Attention`` layout: ``qkv``, ``q_norm``, ``k_norm``, ``scale``) and the grid of
    its input tokens, ``num_prefix_tokens`` first, each token ``stride`` input pixels on a side; ``window``: the
    neighbourhood (kh, kw) it attends to, ``None`` when global."""
    name: str
    attn: nn.Module
    grid_size: tuple[int, int]
    stride: int
    num_prefix_tokens: int
    window: Optional[tuple[int, int]] = None


@runtime_checkable
class Backbone(Protocol):
    """What a registered backbone is. Families document in their docstring which :data:`PARTS` they support."""
    supports: frozenset[str]
    embed_dim: int
    num_prefix_tokens: int
    patch_embed: nn.Module  # pixelformer.layers.PatchEmbed: patchify / unpatchify, img_size, grid_size

    def token_layout(self) -> TokenLayout: ...
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor: ...
    def prepend_prefix(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_tokens(self, x: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor: ...
    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...
    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...
    def attention_sites(self) -> list[AttentionSite]: ...
    def set_input_size(self, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> None: ...
    def set_train_size(self, img_size: Optional[int] = None) -> None: ...
    def condition_blocks(self) -> Iterable[nn.Module]: ...


def require(model: nn.Module, parts: Iterable[str], task: str, name: str) -> None:
    """Refuse a task / backbone pair whose task needs a part of the contract the backbone lacks (one line)."""
    supports = getattr(model, "supports", frozenset())
    missing = [p for p in parts if p not in supports]
    if missing:
        reason = getattr(model, "unsupported_reasons", {}).get(missing[0], "")
        raise UserError(f"task={task} needs the backbone part {missing[0]!r} ({PARTS[missing[0]]}), which "
                        f"model={name} does not have{': ' + reason if reason else ''}; pick a backbone that supports "
                        f"it (pit_* / vit_* support every part)")


# ------------------------------------------------------------------------------------------------ conditioning
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def condition_blocks(backbone: nn.Module, norm_eps: float = 1e-6) -> None:
    """Make every block of ``backbone`` (``backbone.condition_blocks()``) an adaLN-Zero block, as DiT's are:

    * ``norm1`` / ``norm2`` lose their affine parameters (the modulation's shift and scale replace them);
    * the MLP's activation becomes tanh-GELU (DiT's);
    * a ``adaLN_modulation`` (SiLU, Linear(D, 6D)) regresses shift, scale and gate of both sub-layers; the trainer's
      owner zero-initialises it, so each block starts as the identity.

    The backbone's final norm is dropped: the denoiser's output layer normalises with its own modulation. The block's
    ``forward`` becomes ``forward(x, cond)`` (on the instance, so the class and its state-dict keys stay the backbone's
    own) and is reached through ``block(x, cond)``: wrappers that hook a block's call (FSDP gathers its shard there)
    see every use.
    """
    for block in backbone.condition_blocks():
        dim = block.norm1.normalized_shape[0]
        block.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        block.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        block.mlp.act = nn.GELU(approximate="tanh")
        block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        block.forward = types.MethodType(_adaln_zero_forward, block)
    backbone.norm = nn.Identity()
    backbone.conditioned = True


def _adaln_zero_forward(block: nn.Module, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """DiT's block on tokens (B, T, D) conditioned by ``cond`` (B, D); installed by :func:`condition_blocks`."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(cond).chunk(6, dim=1)
    x = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
    return x + gate_mlp.unsqueeze(1) * block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))


def run_block(block: nn.Module, x: torch.Tensor, cond: Optional[torch.Tensor]) -> torch.Tensor:
    """One block on tokens (B, T, D): the block itself, or its adaLN-Zero form (DiT's block) given ``cond`` (B, D)."""
    return block(x) if cond is None else block(x, cond)


# ------------------------------------------------------------------------------------------------ description
def count_flops(model: nn.Module, img_size: int, in_chans: int) -> int:
    """Forward FLOPs of one image, counted by torch's ``FlopCounterMode`` on the meta device (no compute): what the
    CPU path computes (local attention: its windows, not the full score matrix)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {n: p for n, p in model.named_parameters()}
    meta = {n: torch.empty_like(p, device="meta") for n, p in params.items()}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch.func.functional_call(model, {**meta, **buffers},
                                   (torch.empty(1, in_chans, img_size, img_size, device="meta"),))
    return int(counter.get_total_flops())


def describe(model: nn.Module, flops: bool = False) -> dict[str, Any]:
    """The architecture of a backbone, read off the model through the contract: ``depth`` (blocks in all),
    ``embed_dim``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``norm_eps``, ``patch_size``, ``img_size``,
    ``in_chans``, ``grid_size``, ``num_patches``, ``num_prefix_tokens``, ``tokens``, ``levels`` (token count per
    level), ``pos_embed``, ``global_pool``, ``supports``, ``num_params``; with ``flops``, ``gflops`` per image
    forward (:func:`count_flops`)."""
    layout = model.token_layout()
    blocks = list(model.condition_blocks())
    first = blocks[0] if blocks else None
    width = int(model.embed_dim)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    table = getattr(model, "pos_embed", None)
    pos = getattr(model, "pos_embed_kind", None) or (
        "none" if table is None else "learned" if isinstance(table, nn.Parameter) else "sincos")
    out = dict(
        name=getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
        depth=len(blocks), embed_dim=width,
        num_heads=int(first.attn.num_heads) if first is not None else 0,
        mlp_ratio=first.mlp.fc1.out_features / width if first is not None else 0.0,
        qkv_bias=bool(first is not None and first.attn.qkv.bias is not None),
        norm_eps=float(norms[0].eps) if norms else None,
        patch_size=layout.patch_size, img_size=layout.img_size, in_chans=layout.in_chans,
        grid_size=layout.grid_size[0], num_patches=layout.num_patches, num_prefix_tokens=layout.num_prefix_tokens,
        tokens=layout.tokens, levels=[h * w for (h, w), _ in layout.levels], pos_embed=pos,
        global_pool=getattr(model, "global_pool", None), supports=sorted(model.supports),
        num_params=sum(p.numel() for p in model.parameters()),
    )
    if flops:
        out["gflops"] = count_flops(model, layout.img_size, layout.in_chans) / 1e9
    return out
