"""Stage-1 losses for KL and VQ autoencoders, after LDM's ``LPIPSWithDiscriminator`` and taming's
``VQLPIPSWithDiscriminator`` (Rombach et al., 2022; Esser et al., 2021).

Both share :class:`Stage1Loss`: a reconstruction term (L1 or L2, optional LPIPS) and an optional patch GAN
(pix2pix ``NLayerDiscriminator``, hinge loss) that joins after ``disc_start`` steps with taming's adaptive weight
``‖∇nll‖ / ‖∇g‖`` at the decoder's last layer. Each subclass adds its regulariser:

* :class:`KLAutoencoderLoss` (LDM): per image ``nll = Σ_pixels (|x − x̂| or (x − x̂)²) + lpips_weight · LPIPS · #pixels``
  (LDM adds the per-image LPIPS to every pixel before summing; its learned log-variance starts at 0 and is left
  out here), ``kl = Σ_latent KL(q(z|x) ‖ N(0, I))``, both averaged over the batch; ``loss = nll + kl_weight · kl``
  (LDM: kl_weight 1e-6).
* :class:`VQAutoencoderLoss` (taming): ``nll = mean_pixels(|x − x̂|) + lpips_weight · mean(LPIPS)`` (taming's mean,
  so the codebook loss, itself a mean squared error, keeps its scale), ``loss = nll + codebook_weight · q_loss``
  with ``q_loss`` the quantizer's loss (codebook + commitment [+ entropy]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightgen.utils.errors import LightgenConfigError


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


class Stage1Loss(nn.Module):
    """Reconstruction (+ LPIPS) (+ patch GAN) shared by the stage-1 losses; subclasses add the regulariser.

    Subclasses define :meth:`split_output` (the first stage's training output → ``(reconstruction,
    regulariser)``), :meth:`regulariser_loss` (``regulariser → (weighted loss, logs)``) and
    :meth:`check_first_stage`.

    Args:
        reconstruction: ``"l1"`` (LDM, taming) or ``"l2"``.
        lpips_weight: weight of the perceptual term; > 0 needs ``lpips`` (an :class:`~lightgen.first_stage.lpips.LPIPS`;
            built from the installed package when left ``None``).
        disc_weight: > 0 enables the patch GAN (then the LightningModule optimises manually).
        disc_start: generator/discriminator steps before which the GAN terms are off.
        disc_channels: input channels of the discriminator (the images' channels).
        nll_reduction: ``"sum"`` (sum over pixels, mean over images: LDM) or ``"mean"`` (mean over all: taming).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        lpips_weight: float = 0.0,
        lpips: nn.Module | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_channels: int = 1,
        disc_ndf: int = 32,
        disc_layers: int = 2,
        nll_reduction: str = "sum",
    ):
        super().__init__()
        reconstruction_loss(torch.zeros(1), torch.zeros(1), reconstruction)  # validate early
        if nll_reduction not in ("sum", "mean"):
            raise ValueError(f"nll_reduction {nll_reduction!r} is not one of sum, mean.")
        self.reconstruction = reconstruction
        self.nll_reduction = nll_reduction
        self.lpips_weight = float(lpips_weight)
        if self.lpips_weight > 0 and lpips is None:
            from lightgen.first_stage.lpips import LPIPS

            lpips = LPIPS.from_package()
        self.lpips = lpips if self.lpips_weight > 0 else None
        self.disc_weight = float(disc_weight)
        self.disc_start = int(disc_start)
        self.discriminator = NLayerDiscriminator(disc_channels, disc_ndf, disc_layers) if self.disc_weight > 0 else None

    # -- what a subclass provides -----------------------------------------------------------------
    forward_kwargs: dict = {}  # keyword arguments of the first stage's training forward

    def check_first_stage(self, first_stage: nn.Module) -> None:
        """Raise one sentence when ``first_stage`` is not the kind of autoencoder this loss trains."""

    def split_output(self, output) -> tuple[torch.Tensor, object]:
        """The first stage's training output → ``(reconstruction, regulariser)``."""
        return output[0], output[1]

    def regulariser_loss(self, regulariser) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- shared parts ------------------------------------------------------------------------------
    @property
    def uses_gan(self) -> bool:
        return self.discriminator is not None

    def gan_active(self, step: int) -> bool:
        return self.uses_gan and step >= self.disc_start

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """taming's ‖∇nll‖ / ‖∇g_loss‖ at the decoder's last layer, clamped to [0, 1e4], times disc_weight."""
        nll_grads = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        w = torch.linalg.vector_norm(nll_grads) / (torch.linalg.vector_norm(g_grads) + 1e-4)
        return torch.clamp(w, 0.0, 1e4).detach() * self.disc_weight

    def nll(self, images: torch.Tensor, reconstruction: torch.Tensor, logs: dict) -> torch.Tensor:
        """Reconstruction (+ LPIPS) term, reduced by ``nll_reduction``; adds ``rec`` (per pixel), ``lpips`` to logs."""
        rec_map = reconstruction_loss(reconstruction, images, self.reconstruction)
        logs["rec"] = rec_map.mean().detach()
        if self.nll_reduction == "mean":
            nll = rec_map.mean()
            if self.lpips is not None:
                p = self.lpips(images, reconstruction)
                nll = nll + self.lpips_weight * p.mean()
                logs["lpips"] = p.mean().detach()
            return nll
        per_image = rec_map.flatten(1).sum(1)
        if self.lpips is not None:
            p = self.lpips(images, reconstruction)
            per_image = per_image + self.lpips_weight * p * rec_map[0].numel()
            logs["lpips"] = p.mean().detach()
        return per_image.mean()

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        regulariser,
        step: int = 0,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss and the terms to log (``rec`` per pixel, ``nll``, the regulariser's, GAN's)."""
        logs: dict[str, torch.Tensor] = {}
        nll = self.nll(images, reconstruction, logs)
        reg, reg_logs = self.regulariser_loss(regulariser)
        loss = nll + reg
        logs.update(nll=nll.detach(), **reg_logs)
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


class KLAutoencoderLoss(Stage1Loss):
    """Reconstruction + KL (+ LPIPS) (+ patch GAN) for a KL autoencoder (LDM); the regulariser is the posterior.

    Args: those of :class:`Stage1Loss` (the nll summed over pixels, as LDM), and
        kl_weight: weight of the KL term (LDM's kl-f4/f8 configs: 1e-6).
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
        super().__init__(reconstruction, lpips_weight, lpips, disc_weight, disc_start, disc_channels, disc_ndf,
                         disc_layers, nll_reduction="sum")  # fmt: skip
        self.kl_weight = float(kl_weight)

    def check_first_stage(self, first_stage: nn.Module) -> None:
        if not hasattr(first_stage, "set_scale_factor_from_data"):
            raise LightgenConfigError(
                f"method.loss is a KLAutoencoderLoss, which trains KL autoencoders (first_stage=small_kl), not "
                f"{type(first_stage).__name__}; for a VQ first stage use experiment=vq_fashion or "
                f"method.loss._target_=lightgen.first_stage.losses.VQAutoencoderLoss."
            )

    def regulariser_loss(self, posterior) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kl = kl_loss(posterior)
        return self.kl_weight * kl, {"kl": kl.detach()}


class VQAutoencoderLoss(Stage1Loss):
    """Reconstruction (+ LPIPS) + codebook loss (+ hinge patch GAN) for a VQ autoencoder (taming's VQGAN loss).

    The first stage's training output is ``(reconstruction, q_loss, info)``
    (:class:`~lightgen.first_stage.vq.VQFirstStage` with ``return_info=True``); ``q_loss`` is the quantizer's loss
    (codebook + commitment [+ entropy]) and ``info``
    its statistics: ``codebook_usage`` (fraction of codes used in the quantizer's usage window) and
    ``perplexity`` (of this batch's codes) are logged with the quantizer's terms.

    Args: those of :class:`Stage1Loss` (the nll a mean over pixels, as taming), and
        codebook_weight: weight of the quantizer's loss (taming: 1.0).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        codebook_weight: float = 1.0,
        lpips_weight: float = 0.0,
        lpips: nn.Module | None = None,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_channels: int = 1,
        disc_ndf: int = 32,
        disc_layers: int = 2,
    ):
        super().__init__(reconstruction, lpips_weight, lpips, disc_weight, disc_start, disc_channels, disc_ndf,
                         disc_layers, nll_reduction="mean")  # fmt: skip
        self.codebook_weight = float(codebook_weight)

    def check_first_stage(self, first_stage: nn.Module) -> None:
        if not hasattr(first_stage, "codebook_size"):
            raise LightgenConfigError(
                f"method.loss is a VQAutoencoderLoss, which trains VQ first stages (first_stage=vq_small), not "
                f"{type(first_stage).__name__}; for a KL autoencoder use "
                f"method.loss._target_=lightgen.first_stage.losses.KLAutoencoderLoss."
            )

    forward_kwargs = {"return_info": True}

    def split_output(self, output) -> tuple[torch.Tensor, object]:
        reconstruction, q_loss, info = output
        return reconstruction, (q_loss, info)

    def regulariser_loss(self, regulariser) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q_loss, info = regulariser
        logs = {"q_loss": q_loss.detach()}
        for key, name in (("codebook", "codebook_loss"), ("commitment", "commitment_loss"), ("entropy", "entropy_loss"),
                          ("usage", "codebook_usage"), ("perplexity", "perplexity")):  # fmt: skip
            if torch.is_tensor(info.get(key)):
                logs[name] = info[key].detach().float()
        if "perplexity" not in logs and torch.is_tensor(info.get("indices")):  # a quantizer without statistics
            from lightgen.first_stage.quantize import perplexity_from_counts

            logs["perplexity"] = perplexity_from_counts(torch.bincount(info["indices"].flatten()).float())
        return self.codebook_weight * q_loss, logs
