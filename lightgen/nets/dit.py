"""DiT: the diffusion transformer of Peebles & Xie (ICCV 2023), faithful to the official code.

Architecture, initialisation and parameter names follow facebookresearch/DiT ``models.py``, so
released checkpoints (``DiT-XL-2-256x256.pt``) load with ``strict=True`` (see
:mod:`lightgen.convert.dit`). The only additions are input validation with clear errors and optional
activation checkpointing (off by default). Classifier-free guidance (the official
``forward_with_cfg``) is :class:`lightgen.diffusion.guidance.Guider`; the net provides ``null_class``.
"""

from __future__ import annotations

import re

import torch
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    ClassConditional,
    LabelEmbedder,
    TimestepEmbedder,
    check_net_inputs,
    check_transformer_args,
    init_embedders,
    init_linears_xavier,
    modulate,
    sincos_pos_embed,
    unpatchify,
    zero_init,
)

__all__ = ["DIT_CONFIGS", "DiT", "DiTBlock", "FinalLayer", "dit_config"]

#: Official model sizes (``DiT_models`` in the official code); patch size is chosen separately.
DIT_CONFIGS: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


def dit_config(size: str) -> dict[str, int]:
    """Constructor kwargs of an official size: ``"XL"`` -> depth/hidden_size/num_heads;
    ``"XL/2"`` or ``"DiT-XL/2"`` (case-insensitive) also sets ``patch_size``."""
    m = re.fullmatch(r"\s*(?:dit[-_]?)?(s|b|l|xl)(?:\s*[/_-]\s*(\d+))?\s*", str(size), flags=re.IGNORECASE)
    if m is None:
        raise ValueError(
            f"dit_config: unknown DiT size {size!r}; use one of {', '.join(DIT_CONFIGS)} "
            "optionally with a patch size (e.g. 'XL/2')."
        )
    cfg = dict(DIT_CONFIGS[m.group(1).upper()])
    if m.group(2) is not None:
        cfg["patch_size"] = int(m.group(2))
    return cfg


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (official ``DiTBlock``)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear projection to ``patch_size**2 * out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(ClassConditional, nn.Module):
    """Diffusion transformer (official DiT).

    ``forward(x, t, y)`` maps latents (N, in_channels, input_size, input_size), timesteps (N,) and
    class labels (N,) to (N, out_channels, input_size, input_size), ``out_channels = 2*in_channels``
    with ``learn_sigma`` (eps then the variance interpolation), else ``in_channels``.
    Set ``grad_checkpointing = True`` to recompute
    block activations in the backward pass (saves memory, same numbers).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes = check_transformer_args(
            "DiT",
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            num_classes=num_classes,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
        )

        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = in_channels * 2 if self.learn_sigma else in_channels
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, float(class_dropout_prob))
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a frozen Parameter (as official: in state_dict, parameters() and EMA).
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self) -> None:
        """Official initialisation, in the official order (the order fixes the RNG stream): xavier
        Linears, the sin-cos ``pos_embed``, the embedders (patch embedding like a Linear on the
        flattened C*p*p input), then adaLN-Zero."""
        init_linears_xavier(self)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size))
        init_embedders(self.t_embedder, self.y_embedder, self.x_embedder)
        # adaLN-Zero: every block starts as the identity, the output starts at exactly 0.
        final = self.final_layer
        zero_init(*(block.adaLN_modulation[-1] for block in self.blocks), final.adaLN_modulation[-1], final.linear)

    # ------------------------------------------------------------------ shapes
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) tokens -> (N, C_out, H, W) image (square token grid)."""
        return unpatchify(x, self.patch_size, self.out_channels, owner="DiT.unpatchify")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents; t: (N,) timesteps (may be fractional); y: (N,) class labels
        (``num_classes`` = the null class). Returns (N, out_channels, H, W)."""
        t = check_net_inputs("DiT", self, x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if use_ckpt else block(x, c)
        x = self.final_layer(x, c)  # (N, T, p*p*out_channels)
        return self.unpatchify(x)
