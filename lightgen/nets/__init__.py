"""Plain ``torch.nn`` networks (no Lightning, Hydra or diffusion logic)."""

from .diffit import DIFFIT_CONFIGS, TMSA, DiffiT, DiffiTBlock, DiffiTFinalLayer, DiffiTResBlock, DiffiTUNet
from .dit import DIT_CONFIGS, DiT, DiTBlock, FinalLayer, dit_config
from .layers import (
    LabelEmbedder,
    TimestepEmbedder,
    apply_cfg,
    check_positive_int,
    get_1d_sincos_pos_embed_from_grid,
    get_2d_sincos_pos_embed,
    modulate,
    resolve_guidance_channels,
)
from .mdt import MDT, MDT_CONFIGS, MDTAttention, MDTBlock, RelativePositionBias

__all__ = [
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
    "apply_cfg",
    "check_positive_int",
    "dit_config",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "modulate",
    "resolve_guidance_channels",
]
