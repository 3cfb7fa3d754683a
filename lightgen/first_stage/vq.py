"""VQ first stages (tokenizers): images ↔ grids of codebook indices, on diffusers' ``VQModel`` blocks.

:class:`VQFirstStage` is the one interface every tokenizer has (MaskGIT and VQ-Diffusion read only it):

* ``encode_to_indices(images) -> LongTensor (N, h, w)`` and ``decode_indices(indices) -> images`` in
  [-1, 1]; ``codebook_size`` (K), ``codebook_dim`` (D), ``token_size`` (h = w = image_size / downsample);
* the shared first-stage interface, so it slots in where the KL first stages go: ``encode(images)``
  returns the **quantised** latent (the codebook vectors of the indices, (N, D, h, w)), ``decode(latents)``
  decodes such a latent (``quantize=True`` snaps a continuous latent to its nearest codes first);
  ``latent_channels`` = D, ``latent_size`` = h, ``scale_factor`` = 1.0 (codebook vectors are not rescaled).

The network is diffusers' ``VQModel`` (``encoder → quant_conv → quantize → post_quant_conv → decoder``,
held as ``self.vq``), whose blocks are taming-transformers' VQGAN blocks (the taming checkpoint mapping is
:mod:`lightgen.convert.taming`). Tokenisation uses taming's rule: the code with the smallest squared
distance ``|z|² + |e|² − 2 z·e`` to ``quant_conv(encoder(x))``.

Quantizer seam: ``self.quantizer`` (``self.vq.quantize``, so checkpoints keep taming's
``quantize.embedding.weight``) is any module with ``embedding`` (an ``nn.Embedding(K, D)``) whose
``forward(z)`` returns ``(z_q, loss, info)`` with the indices in ``info["indices"]`` (a dict: lightgen's
:class:`~lightgen.first_stage.quantize.VectorQuantizer`) or ``info[-1]`` (a tuple: diffusers' convention).
Tokenising and decoding read only ``quantizer.embedding.weight``; only :meth:`forward` (training) calls
the quantizer. The default is diffusers' ``VectorQuantizer`` (β = 0.25 with taming's legacy placement);
pass ``quantizer=`` (e.g. lightgen's configurable quantizer) to replace it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from lightgen.first_stage.layout import channels_last_on_cuda
from lightgen.first_stage.quantize import STAT_BUFFERS
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.state_dicts import state_dict_mismatch


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Indices (N, h, w) of the nearest codebook rows to each vector of ``z`` (N, D, h, w), taming's rule.

    The squared distance is expanded as ``|z|² + |e|² − 2 z·e`` (taming's ``VectorQuantizer2``), computed
    in ``z``'s dtype; ties go to the lowest index (``argmin``).
    """
    n, d, h, w = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    e = codebook.to(flat.dtype)
    dist = flat.square().sum(1, keepdim=True) + e.square().sum(1) - 2.0 * flat @ e.t()
    return dist.argmin(1).reshape(n, h, w)


def _check_widths(name, widths, attention_levels, z_channels, norm_num_groups) -> list[int]:
    """The attention levels, sorted; one sentence for levels out of range or widths GroupNorm cannot split."""
    levels = len(widths)
    attn = sorted({int(i) for i in attention_levels})
    if any(i < 0 or i >= levels for i in attn):
        raise LightgenConfigError(
            f"first_stage={name} has {levels} levels (block_out_channels={list(widths)}), so "
            f"attention_levels={attn} must lie in 0..{levels - 1}; fix first_stage.attention_levels."
        )
    bad_widths = [c for c in widths + (int(z_channels),) if c % int(norm_num_groups)]
    if bad_widths:
        raise LightgenConfigError(
            f"first_stage={name} uses GroupNorm with {norm_num_groups} groups, which does not divide the "
            f"widths {bad_widths}; use multiples of {norm_num_groups} or set first_stage.norm_num_groups."
        )
    return attn


def _vq_model(channels, widths, attn, layers_per_block, z_channels, codebook_size, codebook_dim, norm_num_groups,
              image_size, mid_block_add_attention):  # fmt: skip
    """diffusers' ``VQModel`` in taming's layout: attention in the levels ``attn`` (encoder order)."""
    from diffusers import VQModel

    levels = len(widths)
    return VQModel(
        in_channels=channels,
        out_channels=channels,
        down_block_types=tuple("AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(levels)),
        up_block_types=tuple(
            "AttnUpDecoderBlock2D" if levels - 1 - j in attn else "UpDecoderBlock2D" for j in range(levels)
        ),
        block_out_channels=widths,
        layers_per_block=int(layers_per_block),
        latent_channels=z_channels,
        num_vq_embeddings=codebook_size,
        vq_embed_dim=codebook_dim,
        norm_num_groups=int(norm_num_groups),
        sample_size=image_size,
        scaling_factor=1.0,
        mid_block_add_attention=bool(mid_block_add_attention),
    )


class VQFirstStage(nn.Module):
    """A VQGAN tokenizer: ``C × H × W`` images ↔ ``h × w`` indices into a ``K × D`` codebook.

    Args:
        image_size: side of the (square) images; must be a multiple of ``downsample``.
        channels: image channels (alias ``in_channels``).
        block_out_channels: widths of the resolution levels (taming's ``ch · ch_mult``); ``L`` levels
            downsample by ``2 ** (L - 1)``.
        layers_per_block: resnet blocks per encoder level (taming's ``num_res_blocks``; the decoder has one more).
        attention_levels: levels (0 = full resolution) with self-attention after each resnet block (taming's
            ``attn_resolutions``: attention at 16² of 256² is level 4 of 5).
        z_channels: encoder output channels (taming's ``z_channels``), before ``quant_conv``.
        codebook_size / codebook_dim: K and D (taming's ``n_embed`` / ``embed_dim``).
        mid_block_add_attention: attention in the middle blocks (taming: always).
        norm_num_groups: GroupNorm groups (taming: 32).
        checkpoint: weights to load: a taming VQGAN checkpoint (``{"state_dict": …}``, converted by
            :mod:`lightgen.convert.taming`), a diffusers ``VQModel`` state dict, a state dict of this class, or a
            lightgen training checkpoint holding one (keys ``net.*``); a local file only.
        requires_checkpoint: ``True`` for pretrained-only tokenizers (``vqgan_f16_1024``): tokenising or
            decoding without loaded weights fails with one sentence instead of using random weights.
        keep_weights_in_checkpoints: ``False`` leaves the weights out of the enclosing module's state dict when
            they come from ``checkpoint`` (re-read from that file on construction), as the SD VAE does.
        quantizer: a replacement for diffusers' quantizer (see the module docstring).
        name: the config name used in error messages.
        token_size / latent_size / latent_channels: optional; checked against the derived values.
    """

    scale_factor = 1.0

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        block_out_channels: Sequence[int] = (64, 128, 128),
        layers_per_block: int = 2,
        attention_levels: Sequence[int] = (),
        z_channels: int = 64,
        codebook_size: int = 512,
        codebook_dim: int = 64,
        mid_block_add_attention: bool = True,
        norm_num_groups: int = 32,
        checkpoint: str | os.PathLike | None = None,
        requires_checkpoint: bool = False,
        keep_weights_in_checkpoints: bool = True,
        quantizer: nn.Module | None = None,
        name: str = "VQFirstStage",
        in_channels: int | None = None,
        token_size: int | None = None,
        latent_size: int | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        self.name = str(name)
        widths = tuple(int(c) for c in block_out_channels)
        levels = len(widths)
        attn = _check_widths(self.name, widths, attention_levels, z_channels, norm_num_groups)
        self.downsample = 2 ** (levels - 1)
        self.image_size = int(image_size)
        if self.image_size % self.downsample:
            raise LightgenConfigError(
                f"first_stage={self.name} downsamples by {self.downsample}, so image_size={self.image_size} must be "
                f"a multiple of {self.downsample}; resize the data (data.image_size) or pick another first stage."
            )
        self.channels = int(channels if in_channels is None else in_channels)
        self.codebook_size = int(codebook_size)
        self.codebook_dim = int(codebook_dim)
        self.z_channels = int(z_channels)
        self.token_size = self.image_size // self.downsample
        self.latent_size = self.token_size
        self.latent_channels = self.codebook_dim
        self._check_declared(token_size=token_size, latent_size=latent_size, latent_channels=latent_channels)
        self.arch = dict(block_out_channels=list(widths), layers_per_block=int(layers_per_block), attention_levels=attn,
                         z_channels=self.z_channels, codebook_size=self.codebook_size, codebook_dim=self.codebook_dim,
                         channels=self.channels)  # fmt: skip
        self.vq = _vq_model(self.channels, widths, attn, layers_per_block, self.z_channels, self.codebook_size,
                            self.codebook_dim, norm_num_groups, self.image_size, mid_block_add_attention)  # fmt: skip
        if quantizer is not None:
            self._set_quantizer(quantizer)
        self.requires_checkpoint = bool(requires_checkpoint)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.has_weights = False
        self.register_load_state_dict_post_hook(_mark_loaded)
        if checkpoint is not None:
            self.load_weights(checkpoint)
            if not keep_weights_in_checkpoints:
                self.register_state_dict_post_hook(_drop_vq_weights)
                self.register_load_state_dict_pre_hook(_fill_vq_weights)

    def _check_declared(self, **declared) -> None:
        """Sizes a config states (optional) must equal the derived ones; one sentence naming the wrong keys."""
        real = {"token_size": self.token_size, "latent_size": self.token_size, "latent_channels": self.codebook_dim}
        wrong = [f"{k}={v} (is {real[k]})" for k, v in declared.items() if v is not None and int(v) != real[k]]
        if wrong:
            raise LightgenConfigError(
                f"first_stage={self.name} does not match the config: {', '.join(wrong)}; token_size = latent_size = "
                f"image_size / {self.downsample} and latent_channels = codebook_dim, so fix those first_stage keys."
            )

    def _set_quantizer(self, quantizer: nn.Module) -> None:
        """Replace diffusers' quantizer by one with an ``embedding`` of K x D codes (the same state-dict key)."""
        emb = getattr(quantizer, "embedding", None)
        if not isinstance(emb, nn.Embedding) or tuple(emb.weight.shape) != (self.codebook_size, self.codebook_dim):
            raise LightgenConfigError(
                f"first_stage={self.name} needs a quantizer with an embedding of {self.codebook_size} x "
                f"{self.codebook_dim} codes, not {type(quantizer).__name__}; match codebook_size/codebook_dim."
            )
        self.vq.quantize = quantizer

    # -- weights ----------------------------------------------------------------------------
    @property
    def quantizer(self) -> nn.Module:
        return self.vq.quantize

    @property
    def codebook(self) -> torch.Tensor:
        """The K × D codebook (``quantizer.embedding.weight``)."""
        return self.quantizer.embedding.weight

    def load_weights(self, source: str | os.PathLike | Mapping) -> None:
        """Load a taming VQGAN / diffusers VQModel / lightgen checkpoint (a path or a loaded dict) strictly."""
        from lightgen.convert.taming import load_vq_file, vq_model_state_dict

        where = str(source) if isinstance(source, (str, os.PathLike)) else "the given state dict"
        obj = load_vq_file(Path(source).expanduser()) if isinstance(source, (str, os.PathLike)) else source
        state = vq_model_state_dict(obj, where)
        target = self.vq.state_dict()
        # usage / EMA statistics of lightgen's quantizer: optional (it restarts them for a bare codebook)
        stats = {"quantize." + name for name in STAT_BUFFERS}
        state = {k: v for k, v in state.items() if k in target or k not in stats}
        detail = state_dict_mismatch(state, target, optional=stats)
        if detail:
            from lightgen.convert.taming import describe_vq_state_dict

            raise LightgenConfigError(
                f"checkpoint {where} holds {describe_vq_state_dict(state)} but first_stage={self.name} is "
                f"{_describe_arch(self.arch)} ({detail}); use the first_stage settings it was trained with."
            )
        self.vq.load_state_dict(state, strict=True)
        self.has_weights = True

    def _require_weights(self) -> None:
        if self.requires_checkpoint and not self.has_weights:
            raise LightgenConfigError(
                f"first_stage={self.name} is a pretrained tokenizer but no weights were given; set "
                f"first_stage.checkpoint=<local file> (a taming VQGAN .ckpt or a lightgen VQ state dict), which "
                f"lightgen never downloads."
            )

    # -- input checks -----------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise LightgenConfigError(
                f"first_stage={self.name} encodes images of shape (N, {self.channels}, H, W), not "
                f"{tuple(images.shape)}; pass a batch of {self.channels}-channel images."
            )
        h, w = images.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise LightgenConfigError(
                f"first_stage={self.name} downsamples by {self.downsample}, so the image size {h}x{w} must be a "
                f"multiple of {self.downsample} on both sides; resize or crop the images."
            )

    def _check_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise LightgenConfigError(
                f"first_stage={self.name} decodes integer code indices, not a {indices.dtype} tensor; pass a "
                f"LongTensor (N, h, w)."
            )
        if indices.ndim != 3:
            raise LightgenConfigError(
                f"first_stage={self.name} decodes index grids of shape (N, h, w), not {tuple(indices.shape)}; "
                f"reshape the tokens to (N, {self.token_size}, {self.token_size})."
            )
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise LightgenConfigError(
                    f"first_stage={self.name} has {self.codebook_size} codes, so indices must lie in "
                    f"[0, {self.codebook_size}) but they span [{lo}, {hi}]; remove mask/class tokens (or offsets) "
                    f"before decoding."
                )

    # -- the interface ----------------------------------------------------------------------
    def encode_continuous(self, images: torch.Tensor) -> torch.Tensor:
        """``quant_conv(encoder(images))``: the pre-quantisation latent (N, D, h, w), with gradients."""
        self._check_images(images)
        return self.vq.quant_conv(self.vq.encoder(images.to(self.codebook.dtype)))

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] → code indices, a LongTensor (N, H/f, W/f)."""
        self._require_weights()
        return nearest_codes(self.encode_continuous(channels_last_on_cuda(self, images)), self.codebook)

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (N, h, w) → their codebook vectors (N, D, h, w)."""
        self._check_indices(indices)
        return self.codebook[indices.long()].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (N, h, w) → images (N, C, h·f, w·f) clamped to [-1, 1]."""
        self._require_weights()
        return self.decode(self.indices_to_latents(indices))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images → the quantised latent (the codebook vectors of :meth:`encode_to_indices`), (N, D, h, w)."""
        return self.indices_to_latents(self.encode_to_indices(images))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Latents (N, D, h, w) → images in [-1, 1]; ``quantize=True`` first replaces each vector by its
        nearest code (for latents that are not codebook vectors already)."""
        self._require_weights()
        if latents.ndim != 4 or latents.shape[1] != self.codebook_dim:
            raise LightgenConfigError(
                f"first_stage={self.name} decodes latents of shape (N, {self.codebook_dim}, h, w), not "
                f"{tuple(latents.shape)}; pass codebook vectors (encode) or use decode_indices."
            )
        latents = latents.to(self.codebook.dtype)
        if quantize:
            latents = self.indices_to_latents(nearest_codes(latents, self.codebook))
        return self._decode(channels_last_on_cuda(self, latents)).clamp(-1, 1)

    def _decode(self, quantised: torch.Tensor) -> torch.Tensor:
        return self.vq.decoder(self.vq.post_quant_conv(quantised))

    def forward(self, images: torch.Tensor, return_info: bool = False):
        """Training pass (with gradients, straight-through): ``(reconstruction, vq_loss, indices (N, h, w))``.

        ``return_info=True`` returns ``(reconstruction, vq_loss, info)`` instead: the quantizer's statistics as a
        dict with ``indices`` (N, h, w) (lightgen's quantizer: also ``usage``, ``perplexity`` and its loss terms;
        a quantizer returning diffusers' tuple gives only ``indices``).
        """
        z = self.encode_continuous(images)
        z_q, loss, info = self.quantizer(z)
        raw = info["indices"] if isinstance(info, Mapping) else info[-1]  # lightgen's dict or diffusers' tuple
        indices = raw.reshape(z.shape[0], z.shape[2], z.shape[3])
        reconstruction = self._decode(z_q)
        if return_info:
            return reconstruction, loss, {**(info if isinstance(info, Mapping) else {}), "indices": indices}
        return reconstruction, loss, indices

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (for taming's adaptive GAN weight)."""
        return self.vq.decoder.conv_out.weight


def _describe_arch(arch: Mapping) -> str:
    return (
        f"a VQ model with block_out_channels={list(arch['block_out_channels'])}, "
        f"layers_per_block={arch['layers_per_block']}, attention_levels={list(arch['attention_levels'])}, "
        f"z_channels={arch['z_channels']} and a {arch['codebook_size']} x {arch['codebook_dim']} codebook"
    )


def _mark_loaded(module, incompatible_keys) -> None:
    if not incompatible_keys.missing_keys:
        module.has_weights = True


def _drop_vq_weights(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "vq.")]:
        del state_dict[k]


def _fill_vq_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for k, v in module.vq.state_dict().items():
        state_dict.setdefault(prefix + "vq." + k, v)
