"""Pixel space: the first stage that does nothing, with the interface every first stage has."""

from __future__ import annotations

import torch
from torch import nn


class IdentityFirstStage(nn.Module):
    """``encode``/``decode`` are the identity; images are already in [-1, 1].

    Every first stage exposes ``latent_channels``, ``latent_size``, ``scale_factor`` and
    ``encode(images) -> latents`` (already scaled) / ``decode(latents) -> images`` in [-1, 1], so
    methods and processes never special-case pixel space.
    """

    scale_factor = 1.0

    def __init__(self, channels: int, image_size: int, latent_channels: int | None = None, latent_size=None):
        super().__init__()
        self.channels = channels
        self.image_size = image_size
        self.latent_channels = channels if latent_channels is None else latent_channels
        self.latent_size = image_size if latent_size is None else latent_size
        if self.latent_channels != channels or self.latent_size != image_size:
            from lightgen.utils.errors import LightgenConfigError

            raise LightgenConfigError(
                f"first_stage=identity keeps images as they are, so latent_channels/latent_size must equal "
                f"the data's channels/image_size ({channels}/{image_size}), not "
                f"{self.latent_channels}/{self.latent_size}; remove those overrides."
            )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
