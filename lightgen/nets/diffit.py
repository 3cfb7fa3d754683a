"""DiffiT: diffusion vision transformers with time-dependent self-attention (Hatamizadeh et al., ECCV 2024).

Two networks share one attention layer and one transformer block:

* :class:`TMSA` -- time-dependent multi-head self-attention (paper Eqs. 3-6). Queries, keys and values
  are linear in the spatial token *and* the time token, ``q_s = x_s W_qs + x_t W_qt`` (likewise k, v),
  i.e. a linear projection of each spatial token concatenated with the time token. As in the
  released code (NVlabs/DiffiT ``diffit/diffit.py``, ``DiffiTAttention``) this is one ``qkv`` linear
  on the tokens plus one ``qkv_temb`` linear on the time token, broadcast over the tokens.
  ``Attention = softmax(QK^T / sqrt(d) + B) V`` with ``B`` a learned Swin-style relative position bias
  over the whole token grid (or over a local window, an option used by the U-shaped net).
* :class:`DiffiTBlock` -- ``x + TMSA(LN(x), x_t)`` then ``x + MLP(LN(x))``; no adaLN, no gates.
* :class:`DiffiT` -- the latent model (paper Sec. 3.2.2), faithful to the released code: patchify,
  frozen 2-D sin-cos position embedding, DiffiT blocks, an *unconditioned* ``Linear(SiLU(LN(x)))``
  head with a zero-initialised linear, learned Sigma. The "time token" is the timestep embedding plus
  the class embedding (``c = t_emb + y_emb``), the only place the label enters. Parameter names,
  creation order and initialisation follow the release, so ``diffit_256.safetensors`` maps 1:1 onto
  this module (depth 28: 561,330,144 parameters). The class default ``depth=30`` is the release's
  class default; the released XL/2 constructor and checkpoints use depth 28.
* :class:`DiffiTUNet` -- the image-space U-shaped model (paper Sec. 3.2.1, Fig. 4). The code was
  never released, so this is lightgen's reading of the paper; see the class docstring for which
  choices are the paper's and which are defaults of ours.

Ablation knob ``time_in_attention`` (both nets, default True = TMSA): with False the blocks have no
``qkv_temb`` (the time terms of q, k, v are gone) and the time token enters additively instead --
in :class:`DiffiT` it is added once to every token after the patch + position embedding; in
:class:`DiffiTUNet` each DiffiT ResBlock adds ``Linear(x_t)`` once to its feature map after the
3x3 conv (the DDPM-style "time embedding by spatial addition" the paper contrasts TMSA with).

CFG (the released ``forward_with_cfg``, "three-channel" guidance, power-cosine scale at 256 px) is
:class:`lightgen.diffusion.guidance.Guider` (``method.sampling.cfg_schedule=power_cosine``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

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
    init_embedders,
    init_linears_xavier,
    sincos_pos_embed,
    unpatchify,
    zero_init,
)

__all__ = [
    "DIFFIT_CONFIGS",
    "TMSA",
    "DiffiT",
    "DiffiTBlock",
    "DiffiTFinalLayer",
    "DiffiTResBlock",
    "DiffiTUNet",
    "relative_position_index",
    "window_partition",
    "window_reverse",
]

#: Transformer sizes of the latent model (DiT's S/B/L/XL widths; the released model is XL/2, depth 28).
DIFFIT_CONFIGS: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}


# ---------------------------------------------------------------------------------------------
# Relative position bias and windows
# ---------------------------------------------------------------------------------------------
def relative_position_index(window_size: int) -> torch.Tensor:
    """(N, N) int64 index into a ``(2W-1)**2`` bias table for a W x W token grid, N = W*W.

    Tokens are enumerated row by row; entry (i, j) is ``(dh + W-1) * (2W-1) + (dw + W-1)`` with
    ``dh = h_i - h_j``, ``dw = w_i - w_j`` -- the Swin / released-DiffiT layout.
    """
    w = int(window_size)
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, C, H, W) feature map -> (B * nH * nW, w*w, C) tokens of non-overlapping w x w windows
    (windows of one sample are contiguous, tokens row by row inside a window)."""
    b, c, h, w = x.shape
    ws = window_size
    x = x.permute(0, 2, 3, 1).reshape(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(tokens: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nH * nW, w*w, C) -> (B, C, H, W)."""
    ws = int(round(tokens.shape[1] ** 0.5))
    c = tokens.shape[-1]
    x = tokens.reshape(batch, height // ws, width // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, c).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# TMSA, block, head
# ---------------------------------------------------------------------------------------------
class TMSA(nn.Module):
    """Time-dependent multi-head self-attention with a learned relative position bias.

    ``forward(x, x_t)``: x (B, N, dim) spatial tokens of a ``window_size`` x ``window_size`` grid,
    x_t (B, temb_dim) time token. ``qkv = qkv(x) + qkv_temb(x_t)`` (the time term broadcast over
    the tokens), per head ``softmax(q k^T / sqrt(d) + B) v``, then ``proj``. ``temb_dim=None``
    builds the ablation without time terms (no ``qkv_temb``; ``x_t`` is ignored).

    Names and creation order as the released ``DiffiTAttention`` (``qkv_temb``, then the bias table
    drawn from trunc-normal(0.02), then ``qkv`` and ``proj``), so the random stream is the same.
    ``persistent_index=False`` keeps the (N, N) index buffer out of the state dict (the U-shaped
    net, which has no official checkpoint); the latent net keeps it, as the release does.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        temb_dim: int | None = None,
        qkv_bias: bool = True,
        persistent_index: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TMSA: dim={dim} is not divisible by num_heads={num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.window_size = int(window_size)
        self.qkv_temb = nn.Linear(temb_dim, 3 * dim) if temb_dim is not None else None
        ws = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=persistent_index)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @property
    def time_in_attention(self) -> bool:
        return self.qkv_temb is not None

    def relative_position_bias(self) -> torch.Tensor:
        """The bias B as (heads, N, N)."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        if n != self.window_size**2:
            raise ValueError(
                f"TMSA: got {n} tokens but the relative position bias is built for a "
                f"{self.window_size}x{self.window_size} grid ({self.window_size**2} tokens)."
            )
        qkv = self.qkv(x)
        if self.qkv_temb is not None:
            if temb is None:
                raise ValueError("TMSA: time_in_attention needs the time token x_t; pass forward(x, temb).")
            qkv = qkv + self.qkv_temb(temb).unsqueeze(1).to(qkv.dtype)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias().unsqueeze(0).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiffiTBlock(nn.Module):
    """``x = x + TMSA(LN(x), x_t)``; ``x = x + MLP(LN(x))`` (paper Eqs. 7-8, released ``DiffiTBlock``).

    LayerNorms without affine parameters (eps 1e-6), timm MLP with tanh-GELU, as released.
    ``temb_dim=None``: attention without time terms (the ablation).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        temb_dim: int | None = None,
        persistent_index: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(hidden_size, num_heads, window_size, temb_dim, True, persistent_index)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), c)
        return x + self.mlp(self.norm2(x))


class DiffiTFinalLayer(nn.Module):
    """``Linear(SiLU(LN(x)))`` to ``patch_size**2 * out_channels`` -- unconditioned, as released."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.silu = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.silu(self.norm_final(x)))


# ---------------------------------------------------------------------------------------------
# Latent DiffiT
# ---------------------------------------------------------------------------------------------
class DiffiT(ClassConditional, nn.Module):
    """Latent DiffiT (released ``diffit.DiffiT``; XL/2 = depth 28, hidden 1152, 16 heads, patch 2).

    ``forward(x, t, y)``: x (N, in_channels, input_size, input_size), t (N,) timesteps, y (N,)
    labels (``num_classes`` = null class) -> (N, out_channels, H, W), ``out_channels =
    2*in_channels`` with ``learn_sigma`` (eps, then the variance interpolation).

    Attention is global over the ``input_size // patch_size`` token grid with one relative position
    bias table per block (the release's "window" is the full grid), in addition to the frozen
    sin-cos ``pos_embed``. Blocks are *not* identity at init (no zero-init inside the blocks, as
    released); the output is exactly 0 at init because the final linear is zero-initialised.
    ``time_in_attention=False``: see the module docstring (time token added once to the tokens).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 30,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        time_in_attention: bool = True,
    ):
        super().__init__()
        input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes = check_transformer_args(
            "DiffiT",
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
        self.time_in_attention = bool(time_in_attention)
        self.grad_checkpointing = False
        grid = input_size // patch_size

        # Creation order as released (it fixes the random stream of the default inits).
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, float(class_dropout_prob))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        temb_dim = hidden_size if self.time_in_attention else None
        self.blocks = nn.ModuleList(
            [DiffiTBlock(hidden_size, num_heads, grid, mlp_ratio, temb_dim) for _ in range(depth)]
        )
        self.final_layer = DiffiTFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Released initialisation, in the released order: xavier-uniform for every Linear (time
        projections included) with zero bias, fixed sin-cos ``pos_embed``, patch embedding xavier on
        the flattened kernel, label table and timestep MLP N(0, 0.02), final linear zero. The bias
        tables keep their trunc-normal(0.02) draw from construction."""
        init_linears_xavier(self)
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size))
        init_embedders(self.t_embedder, self.y_embedder, self.x_embedder)
        zero_init(self.final_layer.linear)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) tokens -> (N, C_out, H, W) (square token grid)."""
        h = w = self.input_size // self.patch_size
        if h * w != x.shape[1]:
            raise ValueError(f"DiffiT.unpatchify: {x.shape[1]} tokens do not form the {h}x{w} grid.")
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = check_net_inputs("DiffiT", self, x, t, y)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # the time token (carries the class too)
        if not self.time_in_attention:
            x = x + c.unsqueeze(1).to(x.dtype)  # ablation: time enters once, additively
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, c, use_reentrant=False) if use_ckpt else block(x, c)
        return self.unpatchify(self.final_layer(x))


# ---------------------------------------------------------------------------------------------
# Image-space (U-shaped) DiffiT
# ---------------------------------------------------------------------------------------------
class DiffiTResBlock(nn.Module):
    """DiffiT ResBlock (paper Eqs. 9-10): ``h = Conv3x3(SiLU(GN(x)))``; ``x + DiffiTBlock(h, x_t)``.

    The (B, C, H, W) map ``h`` is flattened to tokens (row by row) for the transformer block --
    the whole map, or non-overlapping ``window_size`` windows (LN and MLP are per token, so only
    the attention sees the windows). ``time_in_attention=False``: the block has no time terms in
    q, k, v and ``time_proj(x_t)`` is added to ``h`` once, per channel, before the block.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        window_size: int,
        temb_dim: int,
        mlp_ratio: float = 4.0,
        norm_groups: int = 32,
        time_in_attention: bool = True,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = None if time_in_attention else nn.Linear(temb_dim, channels)
        self.block = DiffiTBlock(
            channels,
            num_heads,
            window_size,
            mlp_ratio,
            temb_dim if time_in_attention else None,
            persistent_index=False,
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.silu(self.norm(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(c).to(h.dtype)[:, :, None, None]
        b, _, height, width = h.shape
        tokens = window_partition(h, self.window_size)
        windows = tokens.shape[0] // b
        temb = c.repeat_interleave(windows, dim=0) if windows > 1 else c
        tokens = self.block(tokens, temb)
        return x + window_reverse(tokens, b, height, width)


_UNET = "DiffiTUNet"


def _check_channel_mult(channel_mult) -> list[int]:
    """``channel_mult`` as a non-empty list of positive ints (one per resolution), or one clear error."""
    if isinstance(channel_mult, (str, bytes)) or not isinstance(channel_mult, Sequence) or not channel_mult:
        raise ValueError(
            f"{_UNET}: channel_mult={channel_mult!r} must be a non-empty list of positive integers "
            "(e.g. model.channel_mult=[1,2,2,2])."
        )
    return [
        check_positive_int(_UNET, "channel_mult entry", m, "e.g. model.channel_mult=[1,2,2,2].") for m in channel_mult
    ]


def _check_num_res_blocks(num_res_blocks, stages: int) -> list[int]:
    """ResBlocks per resolution: one positive int for all ``stages``, or one per resolution."""
    if isinstance(num_res_blocks, Sequence) and not isinstance(num_res_blocks, (str, bytes)):
        blocks = [check_positive_int(_UNET, "num_res_blocks entry", n) for n in num_res_blocks]
        if len(blocks) != stages:
            raise ValueError(
                f"{_UNET}: num_res_blocks has {len(blocks)} entries but channel_mult has {stages} resolutions; "
                "give one count per resolution or a single integer (e.g. model.num_res_blocks=2)."
            )
        return blocks
    return [check_positive_int(_UNET, "num_res_blocks", num_res_blocks)] * stages


def _check_level_widths(input_size: int, base_channels: int, mults: list[int], num_heads: int, norm_groups: int):
    """The width of each resolution, ``base_channels * mult``, after checking that the input can be
    halved once per extra resolution and that the heads and the norm groups divide every width."""
    stages = len(mults)
    if input_size % 2 ** (stages - 1):
        raise ValueError(
            f"{_UNET}: input_size={input_size} cannot be halved {stages - 1} times for the {stages} resolutions "
            f"of channel_mult={mults}; use fewer resolutions or an input size divisible by {2 ** (stages - 1)}."
        )
    widths = [base_channels * m for m in mults]
    for width in widths:
        check_heads(_UNET, width, num_heads, what="stage width")
        if width % norm_groups:
            hint = divisor_hint(base_channels, (32, 16, 8, 4, 2))
            raise ValueError(
                f"{_UNET}: stage width {width} is not divisible by norm_groups={norm_groups}; choose a group "
                f"count that divides every width (e.g. model.norm_groups={hint})."
            )
    return widths


def _attention_windows(resolutions: list[int], window_size) -> list[int]:
    """Attention window side per resolution: the whole map (``window_size=None``) or
    ``min(window_size, resolution)``, which must divide the map."""
    if window_size is None:
        return list(resolutions)
    window_size = check_positive_int(
        _UNET, "window_size", window_size, "set e.g. model.window_size=8, or null for global attention."
    )
    windows = [min(window_size, r) for r in resolutions]
    for r, w in zip(resolutions, windows):
        if r % w:
            raise ValueError(
                f"{_UNET}: window_size={window_size} does not divide the {r}x{r} feature map; choose a "
                "power of two (e.g. model.window_size=8) or null for global attention."
            )
    return windows


class DiffiTUNet(ClassConditional, nn.Module):
    """Image-space DiffiT: a U-shaped encoder/decoder of DiffiT ResBlocks (paper Sec. 3.2.1, Fig. 4).

    Layout (S = ``len(channel_mult)`` resolutions ``input_size / 2**i``, widths
    ``base_channels * channel_mult[i]``, L = ``num_res_blocks`` per resolution):

    * ``tokenizer``: Conv3x3 from the input channels to the first width.
    * encoder: at each resolution L DiffiT ResBlocks; between resolutions a stride-2 Conv3x3 that
      also changes the width (``downsamples``). The lowest resolution is the bottleneck, shared by
      both paths.
    * decoder (resolutions S-2 .. 0): nearest x2 upsampling + Conv3x3 (``upsamples``), the skip of
      the encoder at that resolution concatenated, a 1x1 conv back to the width (``skip_projs``, the
      paper's "convolutional layer at the beginning of each path to match the number of feature
      maps"), then L DiffiT ResBlocks -- a skip connection at every resolution above the bottleneck.
    * ``head``: GroupNorm -> SiLU -> Conv3x3 to ``out_channels`` (2x input channels with learn_sigma),
      zero-initialised so the output is 0 at init (as the latent model's head).
    * time token ``x_t = TimestepEmbedder(t) + LabelEmbedder(y)`` of width ``time_embed_dim``
      (sinusoidal features -> MLP with Swish, as the paper; the class embedding with a null row for
      CFG is lightgen's addition -- the paper's image-space models are unconditional).

    From the paper: the U shape, skips at every resolution, L ResBlocks per resolution, the ResBlock
    itself, conv tokenizer and conv down/up-sampling, TMSA with relative position bias. *Not* from
    the paper (its supplementary tables could not be checked here; set them from the PDF when
    reproducing CIFAR-10 / FFHQ-64): the defaults ``base_channels=128, channel_mult=(1, 2, 2, 2),
    num_res_blocks=2, num_heads=4, time_embed_dim=4*base_channels, norm_groups=32``, global
    attention at every resolution (``window_size=None``; an int uses local ``window_size`` windows
    wherever the map is larger -- advisable at 64x64 and above), the concatenation + 1x1 conv
    merge of the skips, nearest-neighbour upsampling, and the zero-initialised head. Linear layers
    are xavier-uniform with zero bias, label table and timestep MLP N(0, 0.02) (as the latent model);
    convolutions keep PyTorch's default init.
    """

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 3,
        num_classes: int = 10,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int | Sequence[int] = 2,
        num_heads: int = 4,
        window_size: int | None = None,
        mlp_ratio: float = 4.0,
        time_embed_dim: int | None = None,
        norm_groups: int = 32,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        time_in_attention: bool = True,
    ):
        super().__init__()
        owner = _UNET
        input_size = check_positive_int(owner, "input_size", input_size)
        in_channels = check_positive_int(owner, "in_channels", in_channels)
        num_classes = check_positive_int(owner, "num_classes", num_classes)
        base_channels = check_positive_int(owner, "base_channels", base_channels)
        num_heads = check_positive_int(owner, "num_heads", num_heads)
        norm_groups = check_positive_int(owner, "norm_groups", norm_groups)
        mults = _check_channel_mult(channel_mult)
        blocks = _check_num_res_blocks(num_res_blocks, len(mults))
        widths = _check_level_widths(input_size, base_channels, mults, num_heads, norm_groups)
        resolutions = [input_size // 2**i for i in range(len(mults))]
        windows = _attention_windows(resolutions, window_size)
        temb_dim = 4 * base_channels if time_embed_dim is None else time_embed_dim
        temb_dim = check_positive_int(owner, "time_embed_dim", temb_dim)
        check_mlp_ratio_and_dropout(owner, mlp_ratio, class_dropout_prob)

        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = in_channels * 2 if self.learn_sigma else in_channels
        self.time_in_attention = bool(time_in_attention)
        self.channels = widths
        self.resolutions = resolutions
        self.windows = windows
        self.num_res_blocks = blocks
        self.time_embed_dim = temb_dim
        self.grad_checkpointing = False

        self.t_embedder = TimestepEmbedder(temb_dim)
        self.y_embedder = LabelEmbedder(num_classes, temb_dim, float(class_dropout_prob))
        self.tokenizer = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self._build_levels(num_heads, mlp_ratio, norm_groups)
        self.head = nn.Sequential(
            nn.GroupNorm(norm_groups, widths[0], eps=1e-6),
            nn.SiLU(),
            nn.Conv2d(widths[0], self.out_channels, 3, padding=1),
        )
        self.initialize_weights()

    def _build_levels(self, num_heads: int, mlp_ratio: float, norm_groups: int) -> None:
        """The resolution levels, encoder then decoder: ``down_blocks`` (L ResBlocks at each of the S
        resolutions) and the S-1 ``downsamples``; then, indexed by resolution (entry i works at
        resolution i, i = 0 .. S-2), ``upsamples``, ``skip_projs`` and ``up_blocks``."""
        widths, stages = self.channels, len(self.channels)

        def res_blocks(i: int) -> nn.ModuleList:
            args = (widths[i], num_heads, self.windows[i], self.time_embed_dim, mlp_ratio, norm_groups)
            return nn.ModuleList(DiffiTResBlock(*args, self.time_in_attention) for _ in range(self.num_res_blocks[i]))

        self.down_blocks = nn.ModuleList(res_blocks(i) for i in range(stages))
        self.downsamples = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(stages - 1)
        )
        self.upsamples = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(stages - 1))
        self.skip_projs = nn.ModuleList(nn.Conv2d(2 * widths[i], widths[i], 1) for i in range(stages - 1))
        self.up_blocks = nn.ModuleList(res_blocks(i) for i in range(stages - 1))

    def initialize_weights(self) -> None:
        """As the latent model (without patch embedding and ``pos_embed``); convolutions keep
        PyTorch's default init, the head's last conv is zeroed."""
        init_linears_xavier(self)
        init_embedders(self.t_embedder, self.y_embedder)
        zero_init(self.head[-1])

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in blocks:
            h = checkpoint(block, h, c, use_reentrant=False) if use_ckpt else block(h, c)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) images; t: (N,) timesteps; y: (N,) labels. Returns (N, out_channels, H, W)."""
        t = check_net_inputs("DiffiTUNet", self, x, t, y)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        h = self.tokenizer(x)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            if i > 0:
                h = self.downsamples[i - 1](h)
            h = self._run(blocks, h, c)
            skips.append(h)
        skips.pop()  # the bottleneck output continues directly into the decoder
        for i in reversed(range(len(self.up_blocks))):
            h = self.upsamples[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.skip_projs[i](torch.cat([h, skips.pop()], dim=1))
            h = self._run(self.up_blocks[i], h, c)
        return self.head(h)
