"""Stage-1 training: a KL or VQ autoencoder on image batches (``{"image", "label"}``; labels unused)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightgen.first_stage.losses import KLAutoencoderLoss, Stage1Loss
from lightgen.methods.base import LightgenModule
from lightgen.utils.errors import LightgenConfigError


class AutoencoderModule(LightgenModule):
    """Trains ``net``, a first stage, with a stage-1 loss (:class:`~lightgen.first_stage.losses.Stage1Loss`):
    a :class:`~lightgen.first_stage.kl.SmallKLAutoencoder` with a
    :class:`~lightgen.first_stage.losses.KLAutoencoderLoss`, or a :class:`~lightgen.first_stage.vq.VQFirstStage`
    with a :class:`~lightgen.first_stage.losses.VQAutoencoderLoss`. The loss reads the first stage's training
    output (``loss.split_output``: reconstruction and regulariser, the KL posterior or the quantizer's loss and
    statistics) and returns the loss and the terms to log, all logged every step as ``train/*`` (averaged over
    ranks in one collective; for VQ: ``train/codebook_usage``, ``train/perplexity``, the quantizer's terms).

    For a first stage with a learned latent scale (KL: it has ``set_scale_factor_from_data``) the scale factor
    (1 / std of the unscaled latents) is tracked while training: each step
    adds the batch's latent mean and mean square (averaged over ranks in the same collective as the
    logged losses) to an exponential moving average with ``scale_decay``, and the estimate is
    written into ``net.scale_factor`` every step, so every checkpoint (the last one included) carries
    the current value, identical on all ranks, without an extra pass over the data. For the exact
    value of a finished model call ``net.set_scale_factor_from_data(batches)`` (LDM's recipe).
    VQ first stages have no scale (their codebook vectors are used as they are).

    ``first_stage`` is the autoencoder being trained (``first_stage=small_kl`` or ``vq_small``); it is held as
    ``self.net`` so checkpoint keys read ``net.*``.
    With the GAN on (``loss.disc_weight > 0``) optimisation is manual: one autoencoder step, then one
    discriminator step per batch (from ``disc_start`` on), both from ``optimizer``; Lightning's
    ``global_step`` (and so ``trainer.max_steps``) then counts both optimisers' steps.
    """

    def __init__(
        self,
        first_stage: nn.Module,
        optimizer=None,
        loss: Stage1Loss | None = None,
        scheduler=None,
        seed: int = 0,
        config: dict | None = None,
        scale_decay: float = 0.9,
    ):
        super().__init__()
        trainable = hasattr(first_stage, "last_layer") and any(p.requires_grad for p in first_stage.parameters())
        if not trainable:
            raise LightgenConfigError(
                f"stage-1 training needs a trainable autoencoder as first_stage, not {type(first_stage).__name__}; "
                f"select first_stage=small_kl (KL) or first_stage=vq_small (VQ)."
            )
        self.net = first_stage  # the network being trained: checkpoint keys "net.*" (as GenerativeModule)
        self.loss = loss if loss is not None else KLAutoencoderLoss()
        self.loss.check_first_stage(first_stage)
        self.tracks_scale = hasattr(first_stage, "set_scale_factor_from_data")  # KL: a learned latent scale
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        self.config = config
        self.scale_decay = float(scale_decay)
        if self.tracks_scale:
            self.register_buffer("latent_moments", torch.zeros(3, dtype=torch.float64))  # EMA of 1, E[z], E[z^2]
        self.register_buffer("ae_steps", torch.zeros((), dtype=torch.long))  # autoencoder updates so far
        self.automatic_optimization = not self.loss.uses_gan

    # -- optimisation ---------------------------------------------------------------------
    def optimized_parameter_groups(self) -> list[list[nn.Parameter]]:
        groups = [[p for p in self.net.parameters() if p.requires_grad]]
        if self.loss.uses_gan:
            groups.append(list(self.loss.discriminator.parameters()))
        return groups

    def training_step(self, batch, batch_idx):
        images = batch["image"]
        reconstruction, regulariser = self.loss.split_output(self.net(images, **self.loss.forward_kwargs))
        # With the GAN, Lightning's global_step counts both optimisers' steps: count AE updates here.
        step = int(self.ae_steps)
        self.ae_steps += 1
        loss, logs = self.loss.generator_loss(
            images, reconstruction, regulariser, step=step, last_layer=self.net.last_layer
        )
        if self.loss.uses_gan:
            opt_g, opt_d = self.optimizers()
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt_g.step()
            if self.loss.gan_active(step):
                d_loss, d_logs = self.loss.discriminator_loss(images, reconstruction)
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                opt_d.step()
                logs.update(d_logs)
            for sch in self.lr_schedulers() or []:
                sch.step()
        moments = {}
        if self.tracks_scale:  # a KL first stage: the regulariser is its posterior
            z = regulariser.sample() if getattr(self.net, "sample", True) else regulariser.mean
            moments = {"z_mean": z.detach().float().mean(), "z_sq": z.detach().float().square().mean()}
        reduced = self.log_mean_across_ranks({**{f"train/{k}": v for k, v in logs.items()}, **moments}, len(images))
        if self.tracks_scale:
            self._update_scale_factor(reduced["z_mean"], reduced["z_sq"])
        return None if self.loss.uses_gan else loss

    @torch.no_grad()
    def _update_scale_factor(self, z_mean: torch.Tensor, z_sq: torch.Tensor) -> None:
        new = torch.stack([torch.ones_like(z_mean), z_mean, z_sq]).double()
        m = self.latent_moments
        m.mul_(self.scale_decay).add_((1 - self.scale_decay) * new)
        weight, mean, sq = m[0], m[1] / m[0], m[2] / m[0]
        var = (sq - mean.square()).clamp_min(1e-12)
        if weight > 0:
            self.net.scale_factor.fill_(float(var.rsqrt()))

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"scale_factor": float(self.net.scale_factor)}
