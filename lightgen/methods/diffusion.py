"""The generative LightningModule: DiT, MDT and DiffiT (net + Gaussian process + first stage + EMA + optimiser).

The token methods (MaskGIT, VQ-Diffusion) use its subclass :class:`lightgen.methods.tokens.TokenModule`.
"""

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

    def __init__(self, net, process, first_stage, optimizer=None, sampling: dict | None = None, **kwargs):
        super().__init__(net=net, first_stage=first_stage, optimizer=optimizer, **kwargs)
        self.process = process
        self.check_parts()
        self.sampling = resolve_settings(sampling or {})
        process.prepare_net(net)
        self.check_sampling(self.sampling)

    # -- what the process works on (the token module overrides these three) ----------------------
    def check_parts(self) -> None:
        """One sentence when the process, net and first stage cannot work together."""
        if getattr(self.process, "data_kind", "latents") != "latents":
            raise ValueError(
                f"{type(self.process).__name__} models {self.process.data_kind}, not latents; use method=maskgit or "
                f"vq_diffusion (the token methods' module) with it, or a Gaussian process (diffusion=gaussian) with "
                f"this method."
            )

    def batch_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """x0 of a batch: its latents (pre-extracted, or the first stage's encoding of its images)."""
        if "tokens" in batch and "latent" not in batch and "image" not in batch:
            raise ValueError(
                "this batch holds VQ tokens (data=tokens), but a Gaussian-diffusion method needs latents or images; "
                "use data=latents or an image dataset, or a token method (model=maskgit_*)."
            )
        return self.batch_latents(batch)

    def sample_shape(self, n: int) -> tuple[int, ...]:
        fs = self.first_stage
        return (n, fs.latent_channels, fs.latent_size, fs.latent_size)

    def decode_samples(self, x0: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode(x0)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        """The process's loss on the batch's x0; its terms are averaged over ranks and logged as ``train/*``."""
        x = self.batch_inputs(batch)
        loss, terms = self.process.training_losses(self.net, x, {"y": batch["label"]})
        self.log_mean_across_ranks({f"train/{k}": v for k, v in terms.items()}, batch_size=x.shape[0])
        return loss

    # -- sampling ----------------------------------------------------------------------------
    def process_settings(self, settings: dict) -> dict:
        """The sampling settings the process takes (its ``sampling_keys``)."""
        return {k: settings[k] for k in self.process.sampling_keys}

    def check_sampling(self, settings: dict) -> None:
        """One sentence for sampling settings the process cannot run, before any work."""
        self.process.check_sampling(**self.process_settings(settings))

    def guider(self, settings: dict) -> Guider:
        return Guider(
            scale=settings["cfg_scale"],
            schedule=settings["cfg_schedule"],
            scale_pow=settings["scale_pow"],
            on=self.process.guidance_on,
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
        ``steps``, ``sampler``, ``eta``, ``cfg_schedule``, ``scale_pow``, ``guidance_channels``,
        ``choice_temperature``, ``truncation``, ``posterior``, ``purity_weight``; None keeps the default).
        Randomness comes only from ``generator``, so samples are reproducible per seed. ``decode=False`` returns
        the process's x0 (latents or tokens).
        """
        settings = resolve_settings(self.sampling, overrides)
        self.check_sampling(settings)
        net = self.ema if use_ema else self.net
        was_training = net.training
        net.eval()
        out = self.process.sample(
            net,
            self.sample_shape(len(labels)),
            {"y": labels},
            self.guider(settings),
            generator=generator,
            progress=progress,
            device=labels.device,
            **self.process_settings(settings),
        )
        net.train(was_training)
        return self.decode_samples(out) if decode else out
