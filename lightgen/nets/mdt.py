"""MDT / MDTv2: the Masked Diffusion Transformer of Gao et al. (ICCV 2023), faithful to sail-sg/MDT.

One class, :class:`MDT`, builds either version of the official ``masked_diffusion/models.py``:

* ``version="v1"`` -- the ``MDT`` class of the ``mdtv1`` branch: ``depth`` blocks in one list
  (``blocks``); the encoder is ``blocks[:depth - decode_layer]``, the decoder the last
  ``decode_layer`` blocks; the side-interpolater (masked pass) or ``+ decoder_pos_embed`` (full pass)
  sits in between.
* ``version="v2"`` (default) -- the ``MDTv2`` class of ``main``: ``en_inblocks`` and ``en_outblocks``
  (``(depth - decode_layer) // 2`` each) joined by U-ViT-style long skips, then ``de_blocks``
  (``decode_layer``) that each receive the *dense input shortcut* ``x_embedder(x) + pos_embed``
  (taken before masking). Every skip goes through the block's ``skip_linear = Linear(2D, D)``.

Both versions share: attention with a per-block BEiT-style relative position bias, learnable
``pos_embed`` / ``decoder_pos_embed`` (sin-cos initialised), a one-block side-interpolater
(``sideblocks`` + ``mask_token``) with the *masked shortcut*, adaLN-Zero conditioning and DiT's
embedders and final layer. Parameter and buffer names are the official ones (``x_embedder``,
``t_embedder``, ``y_embedder``, ``pos_embed``, ``decoder_pos_embed``, ``blocks`` /
``en_inblocks`` / ``en_outblocks`` / ``de_blocks``, ``sideblocks``, ``mask_token``,
``final_layer``, ``attn.qkv``, ``attn.proj``, ``attn.rel_pos_bias.relative_position_bias_table``,
the persistent buffer ``attn.rel_pos_bias.relative_position_index``, ``skip_linear``), so official
checkpoints load with ``strict=True``; modules are created in the official order, so the default
initialisers consume the random stream as the official code does.

The masking itself (which tokens a sample keeps) is drawn outside the net, by
:class:`lightgen.masking.TokenMasking`; ``forward(x, t, y, mask=info)`` runs the masked pass with it.
Differences from the official code, none of which changes a number: input validation with
one-sentence errors and optional activation checkpointing (off by default). Classifier-free
guidance with MDT's power-cosine schedule (the official ``forward_with_cfg``) is
:class:`lightgen.diffusion.guidance.Guider`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Mlp, PatchEmbed
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dit import DIT_CONFIGS, FinalLayer
from .layers import (
    ClassConditional,
    LabelEmbedder,
    TimestepEmbedder,
    check_net_inputs,
    check_positive_int,
    check_transformer_args,
    init_embedders,
    init_linears_xavier,
    modulate,
    sincos_pos_embed,
    unpatchify,
    zero_init,
)

__all__ = [
    "MDT",
    "MDT_CONFIGS",
    "MDT_DEFAULT_DECODE_LAYER",
    "MDTAttention",
    "MDTBlock",
    "RelativePositionBias",
]

#: Official sizes (``MDT_{S,B,L,XL}_*`` / ``MDTv2_{S,B,L,XL}_2``): DiT's depth, width and heads.
MDT_CONFIGS: dict[str, dict[str, int]] = {k: dict(v) for k, v in DIT_CONFIGS.items()}

#: ``decode_layer`` when none is given: v2 XL/2 scripts use 4, every v1 script uses 2.
MDT_DEFAULT_DECODE_LAYER = {"v1": 2, "v2": 4}


class RelativePositionBias(nn.Module):
    """BEiT-style learned relative position bias of one attention layer (official ``RelativePositionBias``).

    ``relative_position_bias_table`` has ``(2*Wh - 1) * (2*Ww - 1) + 3`` rows (the 3 extra rows are
    BEiT's cls-token slots: allocated, initialised and saved, never indexed) and one column per head,
    ``trunc_normal_(std=0.02)`` (timm's/torch's truncation at the *absolute* bounds +-2, i.e. in effect
    a plain normal). The persistent buffer ``relative_position_index`` (T, T) maps a query/key token
    pair (row-major over the grid, ``meshgrid`` in ``ij`` order) to
    ``(dh + Wh - 1) * (2*Ww - 1) + (dw + Ww - 1)``. ``forward()`` returns the (heads, T, T) bias.
    """

    def __init__(self, window_size: tuple[int, int], num_heads: int):
        super().__init__()
        wh, ww = (int(w) for w in window_size)
        self.window_size = (wh, ww)
        self.num_relative_distance = (2 * wh - 1) * (2 * ww - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)  # (T,) grid coordinates of each token
        d_row = rows[:, None] - rows[None, :] + (wh - 1)  # (T, T) in [0, 2*Wh - 2]
        d_col = cols[:, None] - cols[None, :] + (ww - 1)
        # Persistent, as official: the index is part of every official state_dict.
        self.register_buffer("relative_position_index", d_row * (2 * ww - 1) + d_col)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self) -> torch.Tensor:
        t = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(t, t, -1).permute(2, 0, 1).contiguous()  # (heads, T, T)

    def masked(self, ids_keep: torch.Tensor) -> torch.Tensor:
        """Bias restricted to the kept tokens of each sample: (N, heads, L_keep, L_keep).

        Row ``i``, column ``j`` of sample ``n`` is the full bias between tokens ``ids_keep[n, i]`` and
        ``ids_keep[n, j]`` (the official ``get_masked_rel_bias``: gather on the query, then key axis).
        """
        bias = self.forward()
        n, k = ids_keep.shape
        h, t = bias.shape[0], bias.shape[-1]
        full = bias.unsqueeze(0).expand(n, h, t, t)
        rows = torch.gather(full, 2, ids_keep[:, None, :, None].expand(n, h, k, t))
        return torch.gather(rows, 3, ids_keep[:, None, None, :].expand(n, h, k, k))


class MDTAttention(nn.Module):
    """Multi-head self-attention with a relative position bias (official MDT ``Attention``).

    ``qkv = Linear(D, 3D, bias=True)``, scale ``head_dim ** -0.5``, logits ``+ bias``, softmax,
    ``proj = Linear(D, D)``; computed by ``F.scaled_dot_product_attention`` with the bias as ``attn_mask``
    (the official explicit softmax to float rounding, in one fused kernel). With ``ids_keep`` (masked pass)
    the bias is gathered for the
    kept tokens of each sample. Attention and projection dropout are 0 in MDT and omitted.
    """

    def __init__(self, dim: int, num_heads: int, num_patches: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        side = int(num_patches**0.5)
        self.rel_pos_bias = RelativePositionBias((side, side), num_heads)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        bias = self.rel_pos_bias() if ids_keep is None else self.rel_pos_bias.masked(ids_keep)
        # softmax(q k^T * scale + bias) v as one fused kernel; the bias is an additive float mask
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.scale)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class MDTBlock(nn.Module):
    """adaLN-Zero transformer block with relative-bias attention (official ``MDTBlock``).

    With ``skip=True`` (v2's ``en_outblocks`` and ``de_blocks``) the block first fuses a skip input:
    ``x = skip_linear(cat([x, skip], -1))`` with ``skip_linear = Linear(2D, D)`` (xavier-initialised,
    not zeroed), then runs as usual.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_patches: int, mlp_ratio: float = 4.0, skip=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = MDTAttention(hidden_size, num_heads, num_patches)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=lambda: nn.GELU(approximate="tanh"),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        skip: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep=ids_keep)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def _check_mdt_args(version, decode_layer, mask_ratio, depth: int) -> tuple[str, int]:
    """Check MDT's own constructor arguments; return the normalised ``(version, decode_layer)``.

    ``decode_layer=None`` becomes the version's default (capped at ``depth``). Warns (at the
    caller of ``MDT(...)``) when v2 leaves an odd number of encoder blocks, one of which is dropped.
    """
    version = str(version).strip().lower()
    if version not in MDT_DEFAULT_DECODE_LAYER:
        raise ValueError(f"MDT: version={version!r} is not an MDT version; use model.version=v2 (MDTv2) or v1.")
    if decode_layer is None:
        decode_layer = min(MDT_DEFAULT_DECODE_LAYER[version], depth)
    decode_layer = check_positive_int("MDT", "decode_layer", decode_layer)
    if decode_layer > depth:
        raise ValueError(
            f"MDT: decode_layer={decode_layer} exceeds depth={depth}; the decoder is part of the "
            f"{depth} blocks (e.g. model.decode_layer={min(MDT_DEFAULT_DECODE_LAYER[version], depth)})."
        )
    if mask_ratio is not None and (isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float))):
        raise ValueError(f"MDT: mask_ratio={mask_ratio!r} must be null or a number (e.g. model.mask_ratio=0.3).")
    if version == "v2" and (depth - decode_layer) % 2:
        warnings.warn(
            f"MDT v2: depth - decode_layer = {depth - decode_layer} is odd; as in the official code the "
            f"encoder gets {(depth - decode_layer) // 2} + {(depth - decode_layer) // 2} blocks and one "
            "block of the depth is not built.",
            stacklevel=3,  # the caller of MDT(...)
        )
    return version, decode_layer


class MDT(ClassConditional, nn.Module):
    """Masked Diffusion Transformer, v1 or v2 (official sail-sg/MDT).

    ``forward(x, t, y)`` is the full pass: (N, in_channels, H, W) inputs, (N,) timesteps and labels
    -> (N, out_channels, H, W), ``out_channels = 2*in_channels`` with ``learn_sigma``.
    ``forward(x, t, y, mask=info)`` is the masked pass of training, where ``info`` is a
    :class:`lightgen.masking.TokenMask` (any object with ``ids_keep`` (N, L_keep), ``ids_restore``
    (N, L) and ``mask`` (N, L), 1 = removed): the encoder sees only the kept tokens (with the
    relative bias gathered for them), the side-interpolater fills the removed positions from
    ``mask_token`` and one extra block, and the *masked shortcut*
    ``x = mask * side(x) + (1 - mask) * x_before`` leaves the visible tokens untouched. The full pass
    never uses the side-interpolater (so ``sideblocks`` and ``mask_token`` get gradients only from
    the masked pass).

    Args (as DiT, plus):
        version: ``"v2"`` (MDTv2, default) or ``"v1"``.
        decode_layer: decoder depth (N2); default 4 for v2 (XL/2 scripts), 2 for v1 (all scripts).
            v2 splits the remaining ``depth - decode_layer`` blocks into ``half = (depth -
            decode_layer) // 2`` in- and out-blocks, so an odd remainder silently drops one block, as
            the official code does (a warning says so).
        mask_ratio: as official, only decides whether ``mask_token`` is trainable: ``None`` -> a
            frozen all-zero Parameter (the official sampling setting); a number -> trainable,
            ``normal(std=0.02)``. The ratio actually used comes from the masking info.
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
        version: str = "v2",
        decode_layer: int | None = None,
        mask_ratio: float | None = None,
    ):
        super().__init__()
        input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes = check_transformer_args(
            "MDT",
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
        version, decode_layer = _check_mdt_args(version, decode_layer, mask_ratio, depth)
        self.version = version
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = bool(learn_sigma)
        self.out_channels = in_channels * 2 if self.learn_sigma else in_channels
        self.decode_layer = decode_layer
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.grad_checkpointing = False

        # Modules in the official creation order (the default initialisers draw from the RNG in it).
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, float(class_dropout_prob))
        num_patches = self.x_embedder.num_patches
        self.num_patches = num_patches
        # Learnable in MDT (frozen in DiT), sin-cos initialised.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=True)
        self._build_blocks(mlp_ratio)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.mask_ratio is not None)
        self.initialize_weights()

    # ------------------------------------------------------------------ structure
    @property
    def num_tokens(self) -> int:
        """Latent tokens per sample, the length the masking permutes."""
        return (self.input_size // self.patch_size) ** 2

    def masked_pass_parameters(self) -> list[nn.Parameter]:
        """The parameters only the masked pass trains (side-interpolater and mask token)."""
        return [*self.sideblocks.parameters(), self.mask_token]

    def _build_blocks(self, mlp_ratio: float) -> None:
        """The transformer blocks in the official order: v1's ``blocks`` (encoder and decoder in one
        list) or v2's ``en_inblocks``, ``en_outblocks`` and ``de_blocks``; then the side-interpolater's
        one block (``sideblocks``)."""

        def block(skip: bool = False) -> MDTBlock:
            return MDTBlock(self.hidden_size, self.num_heads, self.num_patches, mlp_ratio=mlp_ratio, skip=skip)

        if self.version == "v1":
            self.blocks = nn.ModuleList([block() for _ in range(self.depth)])
        else:
            half = (self.depth - self.decode_layer) // 2
            self.en_inblocks = nn.ModuleList([block() for _ in range(half)])
            self.en_outblocks = nn.ModuleList([block(skip=True) for _ in range(half)])
            self.de_blocks = nn.ModuleList([block(skip=True) for _ in range(self.decode_layer)])
        self.sideblocks = nn.ModuleList([block() for _ in range(1)])

    def _all_blocks(self) -> list[MDTBlock]:
        if self.version == "v1":
            return [*self.blocks, *self.sideblocks]
        return [*self.en_inblocks, *self.en_outblocks, *self.de_blocks, *self.sideblocks]

    def initialize_weights(self) -> None:
        """Official initialisation, in the official order (the order fixes the RNG stream), as DiT's
        plus the second sin-cos table and the mask token."""
        init_linears_xavier(self)  # incl. qkv, proj, mlp, adaLN, skip_linear
        pos = sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
        with torch.no_grad():
            self.pos_embed.copy_(pos)
            self.decoder_pos_embed.copy_(pos)
        init_embedders(self.t_embedder, self.y_embedder, self.x_embedder)
        # adaLN-Zero in every block, the side block included, and in the final layer.
        final = self.final_layer
        zero_init(*(blk.adaLN_modulation[-1] for blk in self._all_blocks()), final.adaLN_modulation[-1], final.linear)
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ shapes
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C_out) tokens -> (N, C_out, H, W) image (square token grid)."""
        return unpatchify(x, self.patch_size, self.out_channels, owner="MDT.unpatchify")

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: Any) -> torch.Tensor:
        t = check_net_inputs("MDT", self, x, t, y)
        n = x.shape[0]
        if mask is not None:
            shapes = {k: tuple(getattr(mask, k, torch.empty(0)).shape) for k in ("ids_keep", "ids_restore", "mask")}
            keep = shapes["ids_keep"]
            if (
                shapes["ids_restore"] != (n, self.num_patches)
                or shapes["mask"] != (n, self.num_patches)
                or len(keep) != 2
                or keep[0] != n
                or not 0 < keep[1] <= self.num_patches
            ):
                raise ValueError(
                    f"MDT: the masking info must hold ids_keep (N, L_keep), ids_restore and mask (N, L) for "
                    f"N={n} and L={self.num_patches} tokens, got {shapes}; draw it with "
                    f"TokenMasking.sample({n}, {self.num_patches})."
                )
        return t

    # ------------------------------------------------------------------ forward
    def _run(self, block: MDTBlock, x, c, skip=None, ids_keep=None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, skip, ids_keep, use_reentrant=False)
        return block(x, c, skip=skip, ids_keep=ids_keep)

    def forward_side_interpolater(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """Fill the removed positions and un-shuffle: (N, L_keep, D) encoder tokens -> (N, L, D).

        ``mask_token`` is appended for the removed positions, the sequence is un-shuffled with
        ``ids_restore``, ``decoder_pos_embed`` is added (giving ``x_before``), one side block runs on
        the full sequence, and the masked shortcut keeps the side block's output only where
        ``mask == 1``: visible tokens are exactly ``x_before``.
        """
        n, k, d = x.shape
        fill = self.mask_token.expand(n, ids_restore.shape[1] - k, d).to(x.dtype)
        x = torch.cat([x, fill], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = x + self.decoder_pos_embed
        x_before = x
        for side in self.sideblocks:
            x = self._run(side, x, c)
        m = mask.unsqueeze(-1).to(x.dtype)
        return x * m + (1 - m) * x_before

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, mask: Any = None) -> torch.Tensor:
        """x: (N, C, H, W); t: (N,) timesteps (may be fractional); y: (N,) labels (``num_classes`` =
        null class); mask: masking info for the masked pass, ``None`` for the full pass.
        Returns (N, out_channels, H, W)."""
        t = self._check_inputs(x, t, y, mask)
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # (N, D)
        input_skip = x  # v2's dense input shortcut: full length, taken before masking
        ids_keep = None
        if mask is not None:
            ids_keep = mask.ids_keep.to(x.device)
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        def bridge(h: torch.Tensor) -> torch.Tensor:
            if mask is None:
                return h + self.decoder_pos_embed
            return self.forward_side_interpolater(h, c, mask.mask.to(h.device), mask.ids_restore.to(h.device))

        if self.version == "v1":
            first_decoder = self.depth - self.decode_layer
            for i, blk in enumerate(self.blocks):
                if i == first_decoder:
                    x, ids_keep = bridge(x), None
                x = self._run(blk, x, c, ids_keep=ids_keep)
        else:
            skips = []
            for blk in self.en_inblocks:
                x = self._run(blk, x, c, ids_keep=ids_keep)
                skips.append(x)
            for blk in self.en_outblocks:
                x = self._run(blk, x, c, skip=skips.pop(), ids_keep=ids_keep)
            x = bridge(x)
            for blk in self.de_blocks:
                x = self._run(blk, x, c, skip=input_skip)
        x = self.final_layer(x, c)  # (N, T, p*p*out_channels)
        return self.unpatchify(x)
