"""Plain ``torch.nn`` networks (no Lightning, Hydra or diffusion logic)."""

from .diffit import DIFFIT_CONFIGS, TMSA, DiffiT, DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock, DiffiTUNet
from .dit import DIT_CONFIGS, DiT, DiTBlock, FinalLayer, dit_config
from .layers import (
    ClassConditional,
    LabelEmbedder,
    TimestepEmbedder,
    check_heads,
    check_mlp_ratio_and_dropout,
    check_net_inputs,
    check_positive_int,
    check_transformer_args,
    divisor_hint,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)
from .mdt import MDT, MDT_CONFIGS, MDTAttention, MDTBlock, RelativePositionBias

__all__ = [
    "ClassConditional",
    "DIFFIT_CONFIGS",
    "TMSA",
    "DiffiT",
    "DiffiTBlock",
    "DiffiTFinalLayer",
    "DiffiTResBlock",
    "DiffiTUNet",
    "DIT_CONFIGS",
    "DiT",
    "DiTBlock",
    "FinalLayer",
    "LabelEmbedder",
    "MDT",
    "MDT_CONFIGS",
    "MDTAttention",
    "MDTBlock",
    "RelativePositionBias",
    "TimestepEmbedder",
    "check_heads",
    "check_mlp_ratio_and_dropout",
    "check_net_inputs",
    "check_positive_int",
    "check_transformer_args",
    "dit_config",
    "divisor_hint",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "modulate",
    "unpatchify",
]
