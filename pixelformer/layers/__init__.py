"""Small reusable layers shared by every backbone and task head."""
from .attention import Attention, use_fused_attn
from .block import Block
from .patch_embed import PatchEmbed
from .pos_embed import build_sincos_2d_pos_embed, is_sincos_table, load_fixed_table, resize_pos_embed

__all__ = ["Attention", "Block", "PatchEmbed", "build_sincos_2d_pos_embed", "is_sincos_table", "load_fixed_table",
           "resize_pos_embed", "use_fused_attn"]
