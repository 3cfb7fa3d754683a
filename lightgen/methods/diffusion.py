"""The diffusion LightningModule: DiT, MDT and DiffiT (net + Gaussian process + first stage + EMA + optimiser)."""

from __future__ import annotations

import torch

from lightgen.diffusion.guidance import Guider
from lightgen.methods.base import GenerativeModule
from lightgen.sampling import resolve_settings


class DiffusionModule(GenerativeModule):
    """Composes a net, a generative process, a first stage, EMA and an optimiser; no method-specific code.

    Args:
        process: the generative process (``cfg.diffusion``, e.g.
            :class:`~lightgen.diffusion.GaussianDiffusionProcess`, which holds MDT's ``masking``): it draws
            t (and masks) in ``training_losses`` and owns the sampling loop.
        sampling: defaults for :meth:`generate` (``sampler``, ``steps``, ``cfg_scale``, ``cfg_schedule``,
            ``scale_pow``, ``eta``, ``guidance_channels``); see :func:`lightgen.sampling.resolve_settings`.
        Other args: see :class:`GenerativeModule`.
    """

    guidance_on = "eps"  # what classifier-free guidance combines for this family of processes

    def __init__(self, net, process, first_stage, optimizer=None, sampling: dict | None = None, **kwargs):
        super().__init__(net=net, first_stage=first_stage, optimizer=optimizer, **kwargs)
        self.process = process
        self.sampling = resolve_settings(sampling or {})
        process.prepare_net(net)
        process.check_sampling(self.sampling["sampler"], self.sampling["steps"])

    def training_step(self, batch, batch_idx):
        """The process's loss on the batch's latents; its terms are averaged over ranks and logged as ``train/*``."""
        x = self.batch_latents(batch)
        loss, terms = self.process.training_losses(self.net, x, {"y": batch["label"]})
        self.log_mean_across_ranks({f"train/{k}": v for k, v in terms.items()}, batch_size=x.shape[0])
        return loss

    def guider(self, settings: dict) -> Guider:
        return Guider(
            scale=settings["cfg_scale"],
            schedule=settings["cfg_schedule"],
            scale_pow=settings["scale_pow"],
            on=self.guidance_on,
            channels=settings["guidance_channels"],
            num_timesteps=self.process.num_timesteps,
        )

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        use_ema: bool = True,
        decode: bool = True,
        **overrides,
    ) -> torch.Tensor:
        """Class-conditional samples for ``labels`` (decoded to images in [-1, 1] by default).

        ``overrides`` replace any of the method's ``sampling`` settings for this call (``cfg_scale``,
        ``steps``, ``sampler``, ``eta``, ``cfg_schedule``, ``scale_pow``, ``guidance_channels``; None keeps
        the default). Randomness comes only from ``generator``, so samples are reproducible per seed.
        """
        settings = resolve_settings(self.sampling, overrides)
        net = self.ema if use_ema else self.net
        was_training = net.training
        net.eval()
        fs = self.first_stage
        shape = (len(labels), fs.latent_channels, fs.latent_size, fs.latent_size)
        out = self.process.sample(
            net,
            shape,
            {"y": labels},
            self.guider(settings),
            generator=generator,
            sampler=settings["sampler"],
            steps=settings["steps"],
            eta=settings["eta"],
            progress=progress,
            device=labels.device,
        )
        net.train(was_training)
        return fs.decode(out) if decode else out
