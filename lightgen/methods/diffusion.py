"""Gaussian diffusion on images or latents: DiT (and later MDT and DiffiT) training and sampling."""

from __future__ import annotations

import inspect
import warnings

import torch

from lightgen.diffusion.guidance import check_guidance_schedule, guidance_scale
from lightgen.methods.base import GenerativeModule
from lightgen.nets.mdt import MDT


class DiffusionModule(GenerativeModule):
    """Composes a net, an ADM-style Gaussian process, a first stage, EMA and an optimiser.

    Args:
        diffusion: factory ``create_diffusion(timestep_respacing=...)`` (``cfg.diffusion`` with
            ``_partial_``). Training uses all steps; sampling builds respaced processes from it.
        sampling: defaults for :meth:`generate` (sampler, steps, cfg_scale, cfg_schedule, scale_pow, eta).
        masking: MDT's token masking (:class:`lightgen.masking.TokenMasking`, ``cfg.masking``) or None;
            with it every training step adds the masked pass (the net must take ``mask=``).
        Other args: see :class:`GenerativeModule`.
    """

    def __init__(self, net, diffusion, first_stage, optimizer, sampling: dict | None = None, masking=None, **kwargs):
        super().__init__(net=net, first_stage=first_stage, optimizer=optimizer, **kwargs)
        self.diffusion_factory = diffusion
        self.diffusion = diffusion(timestep_respacing="")
        self.sampling = {
            "sampler": "ddpm",
            "steps": 250,
            "cfg_scale": 4.0,
            "cfg_schedule": "constant",
            "scale_pow": 4.0,
            "eta": 0.0,
            **(sampling or {}),
        }
        check_guidance_schedule(self.sampling["cfg_schedule"], self.sampling["scale_pow"])
        self.masking = masking
        if masking is not None and "mask" not in inspect.signature(net.forward).parameters:
            raise ValueError(
                f"masking={getattr(masking, 'name', None) or type(masking).__name__} needs a net with a masked pass "
                f"(MDT), but {type(net).__name__} has none; use masking=none or an MDT model (e.g. model=mdt_s)."
            )
        # MDT without masking: the side-interpolater is never used, so it is frozen (DDP with
        # find_unused_parameters=False and the optimiser skip it); the first training step says so.
        self._warn_plain_mdt = masking is None and isinstance(net, MDT)
        if self._warn_plain_mdt:
            for p in [*net.sideblocks.parameters(), net.mask_token]:
                p.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        """One step of the hybrid diffusion loss; with ``masking`` (MDT) also the masked pass.

        The masked pass reuses x0 and t with its own noise and label dropout (each call of
        ``training_losses`` and of the net draws its own), and the loss is
        ``mean(full) + mean(masked)`` (MDT ``forward_backward``, weight 1:1). As in the official logs,
        ``train/loss``, ``train/mse``, ``train/vb`` are the full pass's terms and ``train/m_loss``,
        ``train/m_mse``, ``train/m_vb`` the masked pass's; the optimised loss is their sum.
        """
        if self._warn_plain_mdt:
            self._warn_plain_mdt = False
            if self.global_rank == 0:
                warnings.warn(
                    "MDT without masking (masking=none) is plain DiT-style training: only the full pass runs and "
                    "the side-interpolater stays frozen; select masking=mdt_v2 (or mdt) for MDT's masked pass.",
                    stacklevel=2,
                )
        x = self.batch_latents(batch)
        y = batch["label"]
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        terms = self.diffusion.training_losses(self.net, x, t, model_kwargs={"y": y})
        loss = terms["loss"].mean()
        logged = {f"train/{k}": v.mean() for k, v in terms.items() if k in ("loss", "mse", "vb")}
        if self.masking is not None:
            num_tokens = (self.net.input_size // self.net.patch_size) ** 2
            info = self.masking.sample(x.shape[0], num_tokens, device=x.device)
            m_terms = self.diffusion.training_losses(self.net, x, t, model_kwargs={"y": y, "mask": info})
            loss = loss + m_terms["loss"].mean()
            logged.update({f"train/m_{k}": v.mean() for k, v in m_terms.items() if k in ("loss", "mse", "vb")})
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
        cfg_schedule: str | None = None,
        scale_pow: float | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        use_ema: bool = True,
        decode: bool = True,
    ) -> torch.Tensor:
        """Class-conditional samples for ``labels`` (decoded to images in [-1, 1] by default).

        ``cfg_scale`` 1 runs the plain conditional forward; otherwise the batch is doubled with the
        null class and the net's ``forward_with_cfg`` guides (on its ``guidance_channels``), with a
        scale that is constant (DiT) or follows MDT's power-cosine schedule in the timestep
        (``cfg_schedule="power_cosine"``, ``scale_pow``; see :mod:`lightgen.diffusion.guidance`).
        Randomness comes only from ``generator``, so samples are reproducible per seed.
        """
        s = self.sampling
        cfg_scale = s["cfg_scale"] if cfg_scale is None else cfg_scale
        steps = s["steps"] if steps is None else steps
        sampler = s["sampler"] if sampler is None else sampler
        eta = s["eta"] if eta is None else eta
        cfg_schedule = s["cfg_schedule"] if cfg_schedule is None else cfg_schedule
        scale_pow = s["scale_pow"] if scale_pow is None else scale_pow
        check_guidance_schedule(cfg_schedule, scale_pow)
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
            model_kwargs = {"y": torch.cat([labels, null])}
            num_timesteps = self.diffusion.num_timesteps

            def model(x, t, y):
                scale = guidance_scale(t, cfg_scale, cfg_schedule, scale_pow, num_timesteps)
                return net.forward_with_cfg(x, t, y, cfg_scale=scale)
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
