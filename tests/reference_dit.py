"""The DiT denoiser as pixelformer wrote it before it was built around the backbone contract (its own blocks, its
own patch embedding): the oracle that tests/test_dit.py holds the backbone-built DiT to, parameter for parameter and
output for output."""
from __future__ import annotations

import math

import torch
from timm.layers import Attention, Mlp
from torch import nn

from pixelformer.layers import PatchEmbed, build_sincos_2d_pos_embed


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) scaled and shifted per sample by (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


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
class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (adaLN-Zero) by the conditioning vector.

    Hand-written because timm has no conditioned block; its attention and MLP are timm's.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=lambda: nn.GELU("tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


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
    """Class-conditional denoiser: noisy image, timestep and label -> noise (and optionally variance) per pixel.

    Args:
        img_size: Square input size.
        patch_size: 1 for pixel tokens.
        in_chans: Image (or latent) channels.
        num_classes: Number of classes; one more embedding row is the null class for guidance.
        embed_dim, depth, num_heads, mlp_ratio: Transformer size.
        class_dropout_prob: Label dropout in training (classifier-free guidance).
        learn_sigma: Also output a variance channel per input channel (output has 2 x in_chans channels).
        pos_embed: ``sincos`` (DiT's fixed table) or ``learned`` (starting from that table).
        norm_eps: LayerNorm epsilon (DiT's is 1e-6).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 1, in_chans: int = 3, num_classes: int = 10,
                 embed_dim: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, learn_sigma: bool = False, pos_embed: str = "sincos",
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"DiT pos_embed must be sincos or learned, got {pos_embed!r}")
        if not norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {norm_eps}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.x_embedder = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.t_embedder = TimestepEmbedder(embed_dim)
        self.y_embedder = LabelEmbedder(num_classes, embed_dim, class_dropout_prob)
        table = build_sincos_2d_pos_embed(embed_dim, self.x_embedder.grid_size)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table.clone())
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth)])
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_chans, norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,), y (B,) -> (B, out_chans, H, W)."""
        tokens = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H / p) * (W / p)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        tokens = self.final_layer(tokens, c)  # (B, N, p * p * out_chans)
        return self.x_embedder.unpatchify(tokens, self.out_chans)
