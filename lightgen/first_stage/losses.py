"""Stage-1 losses for KL autoencoders, after LDM's ``LPIPSWithDiscriminator`` (Rombach et al., 2022).

Per image: ``nll = Σ_pixels (|x − x̂|  or (x − x̂)²) + lpips_weight · LPIPS(x, x̂) · #pixels`` (LDM adds the
per-image LPIPS to every pixel before summing; its learned log-variance starts at 0 and is left
out here), ``kl = Σ_latent KL(q(z|x) ‖ N(0, I))``; both are averaged over the batch and
``loss = nll + kl_weight · kl`` (LDM: kl_weight 1e-6). An optional patch GAN (pix2pix
``NLayerDiscriminator``, hinge loss) joins after ``disc_start`` steps with LDM's adaptive weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Elementwise reconstruction error (no reduction)."""
    if kind == "l1":
        return (target - reconstruction).abs()
    if kind in ("l2", "mse"):
        return (target - reconstruction).square()
    raise ValueError(f"reconstruction loss {kind!r} is not one of l1, l2.")


def kl_loss(posterior) -> torch.Tensor:
    """KL of a diagonal Gaussian posterior to N(0, I): sum over latent dims, mean over the batch."""
    mean, logvar = posterior.mean, posterior.logvar
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class NLayerDiscriminator(nn.Module):
    """pix2pix PatchGAN as in taming/LDM: 4×4 convs, LeakyReLU 0.2, BatchNorm, N(0, 0.02) init."""

    def __init__(self, in_channels: int = 1, ndf: int = 32, n_layers: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class KLAutoencoderLoss(nn.Module):
    """Reconstruction + KL (+ LPIPS) (+ patch GAN) for a KL autoencoder.

    Args:
        reconstruction: ``"l1"`` (LDM) or ``"l2"``.
        kl_weight: weight of the KL term (LDM's kl-f4/f8 configs: 1e-6).
        lpips_weight: weight of the perceptual term; > 0 needs ``lpips`` (an :class:`~lightgen.first_stage.lpips.LPIPS`;
            built from the installed package when left ``None``).
        disc_weight: > 0 enables the patch GAN (then the LightningModule optimises manually).
        disc_start: generator/discriminator steps before which the GAN terms are off.
        disc_channels: input channels of the discriminator (the images' channels).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        lpips_weight: float = 0.0,
        lpips: nn.Module | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_channels: int = 1,
        disc_ndf: int = 32,
        disc_layers: int = 2,
    ):
        super().__init__()
        reconstruction_loss(torch.zeros(1), torch.zeros(1), reconstruction)  # validate early
        self.reconstruction = reconstruction
        self.kl_weight = float(kl_weight)
        self.lpips_weight = float(lpips_weight)
        if self.lpips_weight > 0 and lpips is None:
            from lightgen.first_stage.lpips import LPIPS

            lpips = LPIPS.from_package()
        self.lpips = lpips if self.lpips_weight > 0 else None
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.discriminator = NLayerDiscriminator(disc_channels, disc_ndf, disc_layers) if self.disc_weight > 0 else None

    @property
    def uses_gan(self) -> bool:
        return self.discriminator is not None

    def gan_active(self, step: int) -> bool:
        return self.uses_gan and step >= self.disc_start

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """LDM's ‖∇nll‖ / ‖∇g_loss‖ at the decoder's last layer, clamped to [0, 1e4], times disc_weight."""
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        w = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
        return torch.clamp(w, 0.0, 1e4).detach() * self.disc_weight

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior,
        step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and the terms to log (``rec`` per pixel, ``kl`` per image, …)."""
        rec_map = reconstruction_loss(reconstruction, images, self.reconstruction)
        per_image = rec_map.flatten(1).sum(1)
        logs = {"rec": rec_map.mean().detach()}
        if self.lpips is not None:
            p = self.lpips(images, reconstruction)
            per_image = per_image + self.lpips_weight * p * rec_map[0].numel()
            logs["lpips"] = p.mean().detach()
        nll = per_image.mean()
        kl = kl_loss(posterior)
        loss = nll + self.kl_weight * kl
        logs.update(nll=nll.detach(), kl=kl.detach())
        if self.gan_active(step):
            g_loss = -self.discriminator(reconstruction).mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            else:
                d_weight = torch.tensor(self.disc_weight, device=images.device)
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, reconstruction: torch.Tensor):
        logits_real = self.discriminator(images.detach())
        logits_fake = self.discriminator(reconstruction.detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }
