"""KL autoencoders (diffusers ``AutoencoderKL``) behind the first-stage interface.

Two flavours share ``latent_channels``, ``latent_size``, ``scale_factor``, ``encode`` and ``decode``:

* :class:`PretrainedKL`: a frozen Stable Diffusion VAE (``stabilityai/sd-vae-ft-ema`` / ``-mse``, f8, 4
  channels, scale factor 0.18215 as in DiT), read from a local directory or the Hugging Face cache only.
* :class:`SmallKLAutoencoder`: lightgen's own small KL autoencoder (f4, 4 channels) for 32×32 images,
  trained with :class:`lightgen.methods.autoencoder.AutoencoderModule`; its scale factor is a buffer
  estimated from data (1 / std of the latents, the LDM recipe), so checkpoints carry it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lightgen.first_stage.layout import channels_last_on_cuda
from lightgen.utils.errors import LightgenConfigError


def _check_divisible(image_size: int, factor: int, name: str) -> None:
    if image_size % factor != 0:
        raise LightgenConfigError(
            f"first_stage={name} downsamples by {factor}, so image_size={image_size} must be a multiple of {factor}; "
            f"resize the data (data.image_size) or pick another first stage."
        )


def _hub_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


class PretrainedKL(nn.Module):
    """A frozen pretrained ``AutoencoderKL`` (Stable Diffusion VAE), f8 with 4 latent channels.

    Args:
        path_or_id: a local ``save_pretrained`` directory, or a Hugging Face repo id looked up in the
            local cache (``huggingface-cli download stabilityai/sd-vae-ft-ema`` fills it).
        image_size: pixel size of the (square) images; ``latent_size = image_size // 8``.
        scale_factor: latents are multiplied by it after encoding (SD / DiT: 0.18215).
        sample: ``True`` encodes to a posterior sample (DiT's training), ``False`` to its mean.
        local_files_only: ``None``/``True`` never touches the network (lightgen's default);
            ``False`` lets diffusers download from the hub.
        cache_dir: Hugging Face hub cache (default: ``huggingface_hub.constants.HF_HUB_CACHE``).
        keep_weights_in_checkpoints: ``False`` (default) leaves the VAE's weights out of the enclosing
            module's ``state_dict`` (they are re-read from ``path_or_id``), so training checkpoints stay
            small; loading such a checkpoint keeps the weights loaded here.

    Weights are frozen and the VAE stays in eval mode.
    """

    latent_channels = 4
    downsample = 8

    def __init__(
        self,
        path_or_id: str = "stabilityai/sd-vae-ft-ema",
        image_size: int = 256,
        scale_factor: float = 0.18215,
        sample: bool = True,
        local_files_only: bool | None = None,
        cache_dir: str | None = None,
        keep_weights_in_checkpoints: bool = False,
        channels: int | None = None,
        latent_channels: int | None = None,
        latent_size: int | None = None,
    ):
        super().__init__()
        name = f"PretrainedKL({path_or_id})"
        _check_divisible(int(image_size), self.downsample, name)
        self.image_size = int(image_size)
        self.latent_size = self.image_size // self.downsample
        self._check_declared(channels, latent_channels, latent_size, name)
        self.channels = 3
        self.scale_factor = float(scale_factor)
        self.sample = bool(sample)
        self.path_or_id = str(path_or_id)
        self.vae = self._load(str(path_or_id), local_files_only, cache_dir)
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.keep_weights_in_checkpoints = keep_weights_in_checkpoints
        if not keep_weights_in_checkpoints:
            self.register_state_dict_post_hook(_drop_vae_weights)
            self.register_load_state_dict_pre_hook(_fill_vae_weights)

    def _check_declared(self, channels, latent_channels, latent_size, name) -> None:
        wrong = []
        if channels is not None and int(channels) != 3:
            wrong.append(f"channels={channels} (needs 3, RGB)")
        if latent_channels is not None and int(latent_channels) != self.latent_channels:
            wrong.append(f"latent_channels={latent_channels} (is {self.latent_channels})")
        if latent_size is not None and int(latent_size) != self.latent_size:
            wrong.append(f"latent_size={latent_size} (is image_size/8 = {self.latent_size})")
        if wrong:
            raise LightgenConfigError(
                f"first_stage={name} does not match the config: {', '.join(wrong)}; fix those first_stage keys."
            )

    @staticmethod
    def _load(path_or_id: str, local_files_only: bool | None, cache_dir: str | None):
        from diffusers import AutoencoderKL

        local = Path(path_or_id).expanduser()
        looks_like_path = local.exists() or path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
        if looks_like_path:
            if not (local / "config.json").is_file():
                raise LightgenConfigError(
                    f"no AutoencoderKL weights at {local} (expected config.json and the safetensors file "
                    f"from save_pretrained there); point first_stage.path_or_id to such a directory or to a hub id "
                    f"in the local cache."
                )
            where = str(local)
            kwargs = {"local_files_only": True}
        else:
            offline = True if local_files_only is None else bool(local_files_only)
            where = _hub_cache_dir(cache_dir)
            kwargs = {"local_files_only": offline, "cache_dir": where}
        try:
            return AutoencoderKL.from_pretrained(str(local) if looks_like_path else path_or_id, **kwargs)
        except (OSError, ValueError) as e:
            raise LightgenConfigError(
                f"could not load the VAE {path_or_id!r} from {where} ({type(e).__name__}); get it on a machine with "
                f"network with `huggingface-cli download {path_or_id}` (and copy the cache, or save_pretrained to a "
                f"directory and set first_stage.path_or_id=<dir>), or allow the download with "
                f"first_stage.local_files_only=false."
            ) from e

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: always in eval mode
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        images = channels_last_on_cuda(self.vae, images.to(self.vae.dtype))
        dist = self.vae.encode(images).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mean
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = channels_last_on_cuda(self.vae, latents.to(self.vae.dtype) / self.scale_factor)
        return self.vae.decode(latents).sample.clamp(-1, 1)


def _drop_vae_weights(module, state_dict, prefix, local_metadata):
    for k in [k for k in state_dict if k.startswith(prefix + "vae.")]:
        del state_dict[k]


def _fill_vae_weights(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for k, v in module.vae.state_dict().items():
        state_dict.setdefault(prefix + "vae." + k, v)


def _norm_groups(widths: Iterable[int]) -> int:
    g = math.gcd(*widths)
    return max(d for d in range(1, min(32, g) + 1) if g % d == 0)


class SmallKLAutoencoder(nn.Module):
    """A small trainable KL autoencoder (diffusers ``AutoencoderKL``), by default 1×32×32 → 4×8×8.

    ``len(block_out_channels)`` resolution levels downsample by ``2 ** (levels - 1)``, which must equal
    ``downsample``. ``scale_factor`` is a buffer (saved with the weights); set it with
    :meth:`set_scale_factor_from_data` once the autoencoder is trained.

    Args:
        checkpoint: a checkpoint of :class:`~lightgen.methods.autoencoder.AutoencoderModule` (or a
            ``state_dict`` of this class) to load weights and scale factor from; ``None`` = random init.
        channels: alias of ``in_channels`` (the first-stage configs name it like the data's).
        latent_size: optional; checked against ``image_size // downsample``.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        latent_channels: int = 4,
        downsample: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        scale_factor: float = 1.0,
        sample: bool = True,
        mid_block_add_attention: bool = True,
        norm_num_groups: int | None = None,
        checkpoint: str | None = None,
        channels: int | None = None,
        latent_size: int | None = None,
    ):
        super().__init__()
        from diffusers import AutoencoderKL

        block_out_channels = tuple(int(c) for c in block_out_channels)
        levels = len(block_out_channels)
        if 2 ** (levels - 1) != int(downsample):
            raise LightgenConfigError(
                f"first_stage=SmallKLAutoencoder has {levels} levels (block_out_channels={list(block_out_channels)}), "
                f"which downsample by {2 ** (levels - 1)}, not downsample={downsample}; give log2(downsample)+1 widths."
            )
        _check_divisible(int(image_size), int(downsample), "SmallKLAutoencoder")
        self.in_channels = int(in_channels if channels is None else channels)
        self.channels = self.in_channels
        self.image_size = int(image_size)
        self.downsample = int(downsample)
        self.latent_channels = int(latent_channels)
        self.latent_size = self.image_size // self.downsample
        if latent_size is not None and int(latent_size) != self.latent_size:
            raise LightgenConfigError(
                f"first_stage.latent_size={latent_size} but image_size {image_size} / downsample {downsample} gives "
                f"{self.latent_size}; set first_stage.latent_size={self.latent_size}."
            )
        self.sample = bool(sample)
        groups = _norm_groups(block_out_channels) if norm_num_groups is None else int(norm_num_groups)
        self.vae = AutoencoderKL(
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=block_out_channels,
            layers_per_block=int(layers_per_block),
            latent_channels=self.latent_channels,
            norm_num_groups=groups,
            sample_size=self.image_size,
            scaling_factor=float(scale_factor),
            mid_block_add_attention=mid_block_add_attention,
        )
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        if checkpoint is not None:
            self.load_weights(checkpoint)

    # -- checkpoints ------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs) -> SmallKLAutoencoder:
        """Build with ``kwargs`` (the architecture it was trained with) and load ``path``."""
        return cls(checkpoint=str(path), **kwargs)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load an AutoencoderModule checkpoint (keys ``net.*``) or a plain state dict of this class."""
        from lightgen.utils.checkpoints import load_checkpoint
        from lightgen.utils.state_dicts import net_state_dict

        ckpt = load_checkpoint(path, mmap=False)
        state = net_state_dict(ckpt) if "state_dict" in ckpt else ckpt
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise LightgenConfigError(
                f"checkpoint {path} does not hold this SmallKLAutoencoder ({str(e).splitlines()[0]}); use the "
                f"first_stage settings it was trained with."
            ) from e

    # -- scale factor -----------------------------------------------------------------------
    @torch.no_grad()
    def set_scale_factor_from_data(self, data, max_batches: int | None = None) -> float:
        """Set ``scale_factor = 1 / std`` of the unscaled latents of ``data`` (LDM's recipe).

        ``data``: an image tensor (N, C, H, W) in [-1, 1], or an iterable of such tensors or of
        ``{"image": ...}`` batches (the first ``max_batches`` are used). Returns the new value.
        """
        batches = [data] if torch.is_tensor(data) else data
        was_training = self.training
        self.eval()
        n, s1, s2 = 0, 0.0, 0.0
        device = self.scale_factor.device
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            images = batch["image"] if isinstance(batch, dict) else batch
            z = self.encode_unscaled(images.to(device)).double()
            n, s1, s2 = n + z.numel(), s1 + z.sum().item(), s2 + z.square().sum().item()
        self.train(was_training)
        if n < 2:
            raise ValueError("set_scale_factor_from_data needs at least one batch of images.")
        var = (s2 - s1 * s1 / n) / (n - 1)
        value = 1.0 / math.sqrt(max(var, 1e-12))
        self.scale_factor.fill_(value)
        return value

    # -- the interface ----------------------------------------------------------------------
    def encode_unscaled(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        return dist.sample(generator=generator) if self.sample else dist.mean

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode_unscaled(channels_last_on_cuda(self, images), generator) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(channels_last_on_cuda(self, latents / self.scale_factor)).sample.clamp(-1, 1)

    def forward(self, images: torch.Tensor, sample_posterior: bool = True, generator=None):
        """Training pass (with gradients): ``(reconstruction, posterior)``; the posterior is diffusers'
        ``DiagonalGaussianDistribution`` (``.mean``, ``.logvar``, ``.kl()``)."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.vae.decode(z).sample, posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight (for LDM's adaptive GAN weight)."""
        return self.vae.decoder.conv_out.weight
