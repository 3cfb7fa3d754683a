"""Gaussian diffusion on images or latents: DiT (and later MDT and DiffiT) training and sampling."""

from __future__ import annotations

import torch

from lightgen.methods.base import GenerativeModule


class DiffusionModule(GenerativeModule):
    """Composes a net, an ADM-style Gaussian process, a first stage, EMA and an optimiser.

    Args:
        diffusion: factory ``create_diffusion(timestep_respacing=...)`` (``cfg.diffusion`` with
            ``_partial_``). Training uses all steps; sampling builds respaced processes from it.
        sampling: defaults for :meth:`generate` (sampler, steps, cfg_scale, eta).
        Other args: see :class:`GenerativeModule`.
    """

    def __init__(self, net, diffusion, first_stage, optimizer, sampling: dict | None = None, **kwargs):
        super().__init__(net=net, first_stage=first_stage, optimizer=optimizer, **kwargs)
        self.diffusion_factory = diffusion
        self.diffusion = diffusion(timestep_respacing="")
        self.sampling = {"sampler": "ddpm", "steps": 250, "cfg_scale": 4.0, "eta": 0.0, **(sampling or {})}

    def training_step(self, batch, batch_idx):
        x = self.batch_latents(batch)
        y = batch["label"]
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        terms = self.diffusion.training_losses(self.net, x, t, model_kwargs={"y": y})
        loss = terms["loss"].mean()
        logged = {f"train/{k}": v.mean() for k, v in terms.items() if k in ("loss", "mse", "vb")}
        self.log_mean_across_ranks(logged, batch_size=x.shape[0])
        return loss

    # -- sampling -------------------------------------------------------------------------
    def sampling_process(self, sampler: str, steps: int):
        if sampler == "ddpm":
            return self.diffusion_factory(timestep_respacing=str(steps))
        if sampler == "ddim":
            return self.diffusion_factory(timestep_respacing=f"ddim{steps}")
        raise ValueError(f"sampler={sampler!r} is not a Gaussian-diffusion sampler; use ddpm or ddim.")

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        cfg_scale: float | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        use_ema: bool = True,
        decode: bool = True,
    ) -> torch.Tensor:
        """Class-conditional samples for ``labels`` (decoded to images in [-1, 1] by default).

        ``cfg_scale`` 1 runs the plain conditional forward; otherwise the batch is doubled with the
        null class and the net's ``forward_with_cfg`` guides (DiT: on its ``guidance_channels``).
        Randomness comes only from ``generator``, so samples are reproducible per seed.
        """
        s = self.sampling
        cfg_scale = s["cfg_scale"] if cfg_scale is None else cfg_scale
        steps = s["steps"] if steps is None else steps
        sampler = s["sampler"] if sampler is None else sampler
        eta = s["eta"] if eta is None else eta
        net = self.ema if use_ema else self.net
        was_training = net.training
        net.eval()
        process = self.sampling_process(sampler, steps)
        fs = self.first_stage
        shape = (len(labels), fs.latent_channels, fs.latent_size, fs.latent_size)
        noise_device = generator.device if generator is not None else labels.device
        noise = torch.randn(shape, generator=generator, device=noise_device).to(labels.device)
        if cfg_scale != 1.0:
            if getattr(net, "y_embedder", None) is not None and net.y_embedder.dropout_prob <= 0:
                raise ValueError("classifier-free guidance needs a net trained with label dropout (null class).")
            null = torch.full_like(labels, net.num_classes)
            noise = torch.cat([noise, noise])
            model_kwargs = {"y": torch.cat([labels, null]), "cfg_scale": cfg_scale}
            model = net.forward_with_cfg
        else:
            model_kwargs = {"y": labels}
            model = net.forward
        kwargs = dict(
            noise=noise,
            clip_denoised=False,
            model_kwargs=model_kwargs,
            progress=progress,
            generator=generator,
            device=labels.device,
        )
        if sampler == "ddim":
            out = process.ddim_sample_loop(model, noise.shape, eta=eta, **kwargs)
        else:
            out = process.p_sample_loop(model, noise.shape, **kwargs)
        if cfg_scale != 1.0:
            out = out[: len(labels)]
        net.train(was_training)
        return fs.decode(out) if decode else out
