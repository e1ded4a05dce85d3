"""DiT-style class-conditional denoiser over pixel (or patch) tokens.

Paper: W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748; on pixel tokens in
Nguyen et al., arXiv 2406.09415 (DiT-L/2 vs PiT-L). Every block is conditioned on the timestep and class through
adaLN-Zero: a zero-initialised linear layer regresses shift, scale and gate of each sub-layer, so every block starts as
the identity and the whole denoiser starts by predicting zero. The denoiser is built around any registered backbone
(the backbone contract's conditioning part): ``pit_small`` = 12 blocks x 384 wide x 6 heads, patch 1 (DiT exactly);
``vit_small`` the same with patch 2; ``pit_local_*`` and ``pit_hourglass_*`` bring their own blocks and levels; a
user-registered backbone works the same way.

The noise schedule, losses and samplers live outside the model (diffusers schedulers, ``pixelformer/tasks/dit.py``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._registry import create_backbone
from .backbone import condition_blocks, modulate, require

__all__ = ["DiT", "FinalLayer", "LabelEmbedder", "TimestepEmbedder", "create_dit"]


#################################################################################
#               Embedding layers for timesteps and class labels                 #
#################################################################################
class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, D): sinusoidal frequencies followed by a two-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.frequencies(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D); label ``num_classes`` is the "no class" token of classifier-free guidance.

    In training, each label is replaced by the null label with probability ``dropout_prob``.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT model                                #
#################################################################################
class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from each token to its patch of output values."""

    def __init__(self, dim: int, patch_size: int, out_chans: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional denoiser: noisy image, timestep and label -> noise (and optionally variance) per pixel,
    around any registered backbone (:mod:`pixelformer.models.backbone`).

    The backbone embeds the image and runs its own blocks, made adaLN-Zero blocks by
    :func:`~pixelformer.models.backbone.condition_blocks`; the timestep and label embeddings sum to the
    conditioning vector every block is modulated by, and the final layer maps each input-level token to its patch of
    output values. With a ``pit_*`` / ``vit_*`` backbone this is DiT exactly: the same parameters, initialisation
    (the same random draws) and forward; ``reference_state_dict()`` gives the reference key names (``x_embedder.``,
    ``blocks.``, ``pos_embed``; other families' extra parts stay under ``backbone.``), and loading takes either.

    Args:
        backbone: A backbone built without head, prefix tokens or its own init (``create_dit`` builds it).
        num_classes: Number of classes; one more embedding row is the null class for guidance.
        class_dropout_prob: Label dropout in training (classifier-free guidance).
        learn_sigma: Also output a variance channel per input channel (output has 2 x in_chans channels).
        pos_embed: ``sincos`` (DiT's fixed table) or ``learned`` (starting from that table).
        norm_eps: LayerNorm epsilon (DiT's is 1e-6).
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 10, class_dropout_prob: float = 0.1,
                 learn_sigma: bool = False, pos_embed: str = "sincos", norm_eps: float = 1e-6) -> None:
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"DiT pos_embed must be sincos or learned, got {pos_embed!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        layout = backbone.token_layout()
        if layout.num_prefix_tokens:
            raise ValueError("the DiT denoiser needs a backbone without prefix tokens (class_token=False, "
                             "reg_tokens=0)")
        dim = backbone.embed_dim
        self.in_chans, self.num_classes = layout.in_chans, num_classes
        self.out_chans = 2 * layout.in_chans if learn_sigma else layout.in_chans
        condition_blocks(backbone, norm_eps)
        if pos_embed == "learned":  # DiT's learned table starts as the fixed one
            table = backbone.pos_embed
            del backbone.pos_embed
            backbone.pos_embed = nn.Parameter(table.clone())
            backbone.pos_embed_kind = "learned"
        self.backbone = backbone
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.final_layer = FinalLayer(dim, layout.patch_size, self.out_chans, norm_eps)
        self._init_weights()

    @property
    def x_embedder(self) -> nn.Module:
        """The backbone's patch embedding (DiT's name): ``patchify`` / ``unpatchify``, ``img_size``, ``grid_size``."""
        return self.backbone.patch_embed

    @property
    def pos_embed(self) -> torch.Tensor:
        return self.backbone.pos_embed

    def _init_weights(self) -> None:
        """DiT's init, its linear layers in DiT's order (timestep MLP, blocks, final layer), so that a pit/vit
        backbone gets the very numbers of the reference DiT from the same seed."""
        linears = [m for m in self.t_embedder.modules() if isinstance(m, nn.Linear)]
        linears += [m for m in self.backbone.modules() if isinstance(m, nn.Linear)]
        linears += [m for m in self.final_layer.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer at zero.
        for block in self.backbone.condition_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_chans, H, W)."""
        tokens = self.backbone.embed_patches(x)  # (B, N, D), N = (H / p) * (W / p), position added
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        tokens = self.backbone.forward_tokens(tokens, c)  # every block modulated by c; input-level tokens out
        tokens = self.final_layer(tokens, c)  # (B, N, p * p * out_chans)
        return self.x_embedder.unpatchify(tokens, self.out_chans)

    # The reference DiT's key names <-> where the parts live here (exact key or prefix).
    _REFERENCE_NAMES = (("backbone.patch_embed.", "x_embedder."), ("backbone.blocks.", "blocks."),
                        ("backbone.pos_embed", "pos_embed"))

    @classmethod
    def _rename(cls, state_dict: dict, prefix: str, to_reference: bool) -> None:
        """Rename in place, keeping the order, the keys under ``prefix`` between here and the reference names."""
        pairs = [(a, b) if to_reference else (b, a) for a, b in cls._REFERENCE_NAMES]
        items = list(state_dict.items())
        state_dict.clear()
        for key, value in items:
            rest = key[len(prefix):] if key.startswith(prefix) else None
            for old, new in pairs:
                if rest is not None and (rest == old if not old.endswith(".") else rest.startswith(old)):
                    key = prefix + new + rest[len(old):]
                    break
            state_dict[key] = value

    @classmethod
    def to_reference_names(cls, state: dict) -> dict:
        """A copy of a denoiser state dict (either naming) under the reference DiT's key names (``x_embedder.``,
        ``blocks.``, ``pos_embed``, ...), the layout DiT's released checkpoints use."""
        renamed = dict(state)
        cls._rename(renamed, "", to_reference=True)
        return renamed

    def reference_state_dict(self) -> dict:
        """``state_dict()`` under the reference DiT's key names: for export, and what checkpoint loading compares.

        ``state_dict()`` itself keeps the module's own names (``backbone.blocks.0...``): wrappers that key on the
        real module paths (FSDP's full-state-dict hooks) need them. Loading takes either naming.
        """
        return self.to_reference_names(self.state_dict())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        self._rename(state_dict, prefix, to_reference=False)  # the children then find their keys
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# DiT's own options; every other keyword sizes the backbone the denoiser is built around.
_DIT_ONLY = ("num_classes", "class_dropout_prob", "learn_sigma", "pos_embed")


def create_dit(backbone: str, **overrides: Any) -> DiT:
    """A DiT around the registered backbone ``backbone``, built without head, prefix tokens or its own init.

    ``overrides`` that size the backbone (``img_size``, ``in_chans``, ``patch_size``, ``depth``, ``embed_dim``, ...)
    are applied to it, so the registry validates them (a ``pit_*`` refuses patches); ``num_classes``,
    ``class_dropout_prob``, ``learn_sigma`` and ``pos_embed`` (``sincos`` by default, DiT's) are the denoiser's.
    ``None`` values keep the defaults.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    dit_args = {k: overrides.pop(k) for k in _DIT_ONLY if k in overrides}
    model = create_backbone(backbone, num_classes=0, class_token=False, global_pool="avg", reg_tokens=0,
                            fc_norm=False, pos_embed="sincos", weight_init="skip", **overrides)
    require(model, ("dense", "conditioning"), "dit", backbone)
    return DiT(model, norm_eps=getattr(model, "norm_eps", 1e-6), **dit_args)
