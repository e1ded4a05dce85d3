"""Masked autoencoder over pixel (or patch) tokens.

Paper: K. He et al., "Masked Autoencoders Are Scalable Vision Learners", arXiv 2111.06377; applied to pixel tokens in
Nguyen et al., arXiv 2406.09415 (mask ratio 0.75). The encoder is any registered :class:`VisionTransformer` and sees
only the visible tokens; a light decoder fills the masked positions with a learned mask token, adds its own fixed
position embedding and predicts each token's pixels. The loss lives in ``pixelformer/tasks/mae.py``.

Decoder parameter names (``decoder_embed``, ``mask_token``, ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``)
follow the reference MAE code, whose checkpoints therefore map onto this module by name.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ..rng import rand
from ..layers import build_sincos_2d_pos_embed, init_linears_and_norms, load_fixed_table
from .vision_transformer import VisionTransformer

__all__ = ["MaskedAutoencoder", "random_masking"]


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of ``round(N * (1 - mask_ratio))`` tokens per sample.

    Args:
        x: Tokens (B, N, D).
        mask_ratio: Fraction of tokens to remove.

    Returns:
        kept: (B, N_keep, D) visible tokens, in random order.
        mask: (B, N) with 1 where a token was removed, 0 where kept, in the original token order.
        ids_restore: (B, N) the permutation that puts [kept, removed] back into the original order.
    """
    batch, tokens, dim = x.shape
    num_keep = int(round(tokens * (1 - mask_ratio)))
    if not 0 < num_keep <= tokens:
        raise ValueError(f"mask_ratio {mask_ratio} keeps {num_keep} of {tokens} tokens: use a ratio in [0, 1)")
    noise = rand((batch, tokens), device=x.device)  # per sample inside pixelformer.rng.per_sample_seeds (evaluation)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the smallest noise values are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :num_keep]
    kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, tokens, device=x.device)
    mask[:, :num_keep] = 0
    mask = mask.gather(1, ids_restore)
    return kept, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    """Encoder (a backbone without head) + light transformer decoder predicting each token's pixels.

    Args:
        encoder: The backbone to pretrain; its head, if any, is not used.
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        mlp_ratio: Decoder MLP ratio.
        norm_eps: LayerNorm epsilon of the decoder; ``None`` takes the encoder's (MAE uses one norm layer for both).
    """

    def __init__(self, encoder: VisionTransformer, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, mlp_ratio: float = 4.0, norm_eps: float | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        embed = encoder.patch_embed
        self.num_prefix_tokens = encoder.num_prefix_tokens
        norm_eps = getattr(encoder, "norm_eps", 1e-6) if norm_eps is None else norm_eps
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        table = build_sincos_2d_pos_embed(decoder_dim, embed.grid_size, self.num_prefix_tokens)
        self.register_buffer("decoder_pos_embed", table, persistent=False)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads, mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, embed.patch_size ** 2 * embed.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's decoder init (mask token normal .02, linear trunc-normal .02, zero biases, LayerNorm ones / zeros),
        kept by hand for the encoder's draws to stay where committed results had them."""
        nn.init.normal_(self.mask_token, std=0.02)
        init_linears_and_norms(m for name, m in self.named_modules() if not name.startswith("encoder"))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        load_fixed_table(self, "decoder_pos_embed", state_dict, prefix, error_msgs)  # checked, never dropped unseen
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def decoder_table(self) -> torch.Tensor:
        """The decoder's sin-cos table on the encoder's current grid (another one while the encoder trains at a lower
        resolution, ``set_train_size``: computed, nothing is learned in it)."""
        grid, table = self.encoder.patch_embed.grid_size, self.decoder_pos_embed
        if table.shape[1] != self.num_prefix_tokens + grid * grid:
            table = build_sincos_2d_pos_embed(table.shape[-1], grid, self.num_prefix_tokens).to(table)
        return table

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C): the reconstruction target of each token."""
        return self.encoder.patch_embed.patchify(images)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        return self.encoder.patch_embed.unpatchify(tokens)

    def forward_encoder(self, images: torch.Tensor, mask_ratio: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible tokens: returns latent (B, prefix + N_keep, D), mask (B, N), ids_restore (B, N)."""
        x = self.encoder.embed_patches(images)  # (B, N, D), positions added before masking
        x, mask, ids_restore = random_masking(x, mask_ratio)
        x = self.encoder.forward_tokens(self.encoder.prepend_prefix(x))
        return x, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                        num_decoded: int | None = None) -> torch.Tensor:
        """latent (B, prefix + N_keep, D) -> predicted pixels (B, N, p*p*C) for every token.

        ``num_decoded``: decode only that many of the masked tokens, the first ones of the masking's random order,
        beside the visible ones (partial reconstruction, as in CrossMAE, arXiv 2401.14391): the decoder's cost, most
        of a pixel MAE's, falls with its token count. The other masked tokens' predictions are zero. None: all.
        """
        if num_decoded is not None and num_decoded < ids_restore.shape[1] - (latent.shape[1] - self.num_prefix_tokens):
            return self._forward_decoder_partial(latent, ids_restore, num_decoded)
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        num_masked = ids_restore.shape[1] - visible.shape[1]
        x = torch.cat([visible, self.mask_token.expand(x.shape[0], num_masked, -1)], dim=1)
        x = x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # back to the original order
        x = torch.cat([prefix, x], dim=1) + self.decoder_table()
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, self.num_prefix_tokens:]

    def _forward_decoder_partial(self, latent: torch.Tensor, ids_restore: torch.Tensor,
                                 num_decoded: int) -> torch.Tensor:
        """:meth:`forward_decoder` on the visible tokens and ``num_decoded`` masked ones. Attention does not depend
        on the tokens' order, so they stay in the masking's order (kept, then removed) with their own positions'
        table rows added; the predictions are scattered back to (B, N, p*p*C)."""
        x = self.decoder_embed(latent)
        batch, prefix, dim = x.shape[0], self.num_prefix_tokens, x.shape[2]
        num_keep = x.shape[1] - prefix
        seen = ids_restore.argsort(dim=1)[:, : num_keep + num_decoded]  # kept, then the first removed: positions
        table = self.decoder_table()  # (1, prefix + N, D)
        tokens = torch.cat([x[:, prefix:], self.mask_token.expand(batch, num_decoded, -1)], dim=1)
        tokens = tokens + table[:, prefix:].expand(batch, -1, -1).gather(1, seen.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :prefix] + table[:, :prefix], tokens], dim=1)
        for block in self.decoder_blocks:
            x = block(x)
        decoded = self.decoder_pred(self.decoder_norm(x[:, prefix + num_keep:]))  # (B, num_decoded, p*p*C)
        where = seen[:, num_keep:].unsqueeze(-1).expand(-1, -1, decoded.shape[2])
        return decoded.new_zeros(batch, ids_restore.shape[1], decoded.shape[2]).scatter(1, where, decoded)

    def forward(self, images: torch.Tensor, mask_ratio: float = 0.75,
                decode_frac: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> predicted pixels (B, N, p*p*C) and the mask (B, N): 1 where a token was masked and
        predicted, the tokens the loss is on. ``decode_frac`` < 1 predicts that share of the masked tokens only
        (:meth:`forward_decoder`); 1 is MAE."""
        latent, mask, ids_restore = self.forward_encoder(images, mask_ratio)
        if decode_frac >= 1:
            return self.forward_decoder(latent, ids_restore), mask
        num_keep = latent.shape[1] - self.num_prefix_tokens
        num_decoded = max(1, round((ids_restore.shape[1] - num_keep) * decode_frac))
        pred = self.forward_decoder(latent, ids_restore, num_decoded)
        decoded = ids_restore.argsort(dim=1)[:, num_keep: num_keep + num_decoded]
        return pred, torch.zeros_like(mask).scatter(1, decoded, 1.0)
