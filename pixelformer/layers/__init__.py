"""Small layers the backbones need beside timm's: the int-sized patch embedding, the position tables, the shared init
and local attention."""
from .init import init_linears_and_norms, init_transformer_weights
from .patch_embed import PatchEmbed
from .pos_embed import build_sincos_2d_pos_embed, is_sincos_table, load_fixed_table, resize_pos_embed

__all__ = ["PatchEmbed", "build_sincos_2d_pos_embed", "init_linears_and_norms", "init_transformer_weights",
           "is_sincos_table", "load_fixed_table", "resize_pos_embed"]
from .local_attention import (LocalAttention, best_token_order, block_sparsity, local_attention_layer,
                              neighbourhood_mask, tile_order)

__all__ += ["LocalAttention", "best_token_order", "block_sparsity", "local_attention_layer", "neighbourhood_mask",
            "tile_order"]
