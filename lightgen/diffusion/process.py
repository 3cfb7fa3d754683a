"""Generative processes that own their loops: the interface every method's process implements.

A process knows nothing of a net's class: it calls the net as ``net(x, t, **cond)`` and reads two
documented attributes where it needs them (``null_class`` for guidance, ``num_tokens`` and
``masked_pass_parameters()`` for MDT's masked pass). A LightningModule composes a net, a process, a
first stage, EMA and an optimiser, and delegates to the process:

* ``training_losses(net, x0, cond) -> (loss, terms)`` -- draws its own t (and mask), returns the loss
  to optimise and a dict of scalar terms to log;
* ``sample(net, shape, cond, guider, generator, **settings) -> x0`` -- the whole sampling loop, with
  classifier-free guidance supplied as a :class:`~lightgen.diffusion.guidance.Guider` and the sampling
  settings named by ``sampling_keys``.

Class attributes tell the LightningModule and the config checks what the process needs:
``sampling_keys``, ``guidance_on`` (what the guider combines), ``schedule_kind`` (the kind of the
``schedule`` group it takes) and ``data_kind`` (``latents`` or ``tokens``).

MaskGIT's and VQ-Diffusion's token processes implement the same two methods.
"""

from __future__ import annotations

import inspect
import warnings

import torch

from lightgen.diffusion import create_diffusion, solvers
from lightgen.diffusion.guidance import Guider
from lightgen.utils.rng import draw

SAMPLERS = ("ddpm", "ddim", *solvers.FAST_SAMPLERS)


def flat_codes(x0, net, method: str) -> torch.Tensor:
    """The (N, h, w) code maps of a token batch as (N, L) longs, checked against the net's codebook_size K and
    num_tokens L (one sentence each; the range check costs one host sync): what the token processes train on."""
    k, length = int(net.codebook_size), int(net.num_tokens)
    if not torch.is_tensor(x0) or x0.is_floating_point() or x0.is_complex() or x0.dtype == torch.bool:
        what = x0.dtype if torch.is_tensor(x0) else type(x0).__name__
        raise ValueError(
            f"{method} trains on integer code indices (N, h, w), but got {what}; use data=tokens or a VQ first stage "
            f"(first_stage=vq_small)."
        )
    codes = x0.reshape(x0.shape[0], -1).long()
    if codes.shape[1] != length:
        raise ValueError(
            f"the code maps have {codes.shape[1]} tokens per sample (shape {tuple(x0.shape)}), but the net expects "
            f"num_tokens={length}; match the model's token grid to the first stage."
        )
    if codes.numel():
        lo, hi = torch.stack(torch.aminmax(codes)).tolist()
        if lo < 0 or hi >= k:
            raise ValueError(
                f"code indices must lie in [0, {k}) for codebook_size={k}, but range over [{lo}, {hi}]; match the "
                f"model's codebook_size to the tokenizer."
            )
    return codes


class Process:
    """Base of the generative processes (interface; see the module docstring)."""

    num_timesteps: int = 1000
    samplers: tuple[str, ...] = ()
    # the sampling settings (lightgen.sampling.DEFAULTS) that ``sample`` and ``check_sampling`` take
    sampling_keys: tuple[str, ...] = ("sampler", "steps")
    # what classifier-free guidance combines (a Guider's ``on``): eps | logits | log_probs
    guidance_on: str = "eps"
    # the `schedule` group kind this process needs (gaussian | mask | discrete); checked at start-up
    schedule_kind: str = "gaussian"
    # what the net models: "latents" (continuous, first_stage.encode) or "tokens" (first_stage.encode_to_indices)
    data_kind: str = "latents"

    def prepare_net(self, net) -> None:
        """Check that ``net`` fits this process (one sentence if not) and set what training needs."""

    def training_losses(self, net, x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def check_sampling(self, sampler: str, steps: int, **settings) -> None:
        """Raise one sentence for sampling settings this process cannot run (``sampling_keys`` of them)."""

    def sample(self, net, shape, cond: dict, guider: Guider, generator=None, **settings) -> torch.Tensor:
        raise NotImplementedError


class GaussianDiffusionProcess(Process):
    """ADM Gaussian diffusion as DiT, MDT and DiffiT train and sample it.

    Training: ``t ~ U{0..T-1}`` per sample from the global RNG, the hybrid loss of
    :meth:`GaussianDiffusion.training_losses`; with ``masking`` (MDT) a second, masked pass on the same
    x0 and t with its own noise and label dropout, loss = mean(full) + mean(masked) (MDT's
    ``forward_backward``), logged as ``loss/mse/vb`` (full pass) and ``m_loss/m_mse/m_vb`` (masked pass).
    Sampling: respaced DDPM (``sampler="ddpm"``, ``steps`` e.g. 250) or DDIM (``"ddim"``, ``eta``), the
    state doubled for guidance exactly as DiT's ``sample.py``; or diffusers' DPM-Solver++ 2M, UniPC and Euler
    (``"dpmpp_2m"``, ``"unipc"``, ``"euler"``, e.g. 20 steps) on the same betas (:mod:`lightgen.diffusion.solvers`).

    Args: the ADM settings of :func:`~lightgen.diffusion.create_diffusion` (``noise_schedule``,
    ``diffusion_steps``, ``learn_sigma``, ``sigma_small``, ``predict_xstart``, ``use_kl``,
    ``rescale_learned_sigmas``, ``mse_loss_weighting``, ``min_snr_gamma``) and ``masking``
    (:class:`lightgen.masking.TokenMasking` or None).
    """

    samplers = SAMPLERS
    sampling_keys = ("sampler", "steps", "eta")

    def __init__(self, masking=None, **adm_settings):
        self.adm_settings = adm_settings
        self.diffusion = create_diffusion("", **adm_settings)
        self.num_timesteps = self.diffusion.num_timesteps
        self.masking = masking
        self._warn_unmasked = False

    # -- training -------------------------------------------------------------------------------
    def prepare_net(self, net) -> None:
        masked = "mask" in inspect.signature(net.forward).parameters
        if self.masking is not None and not masked:
            name = getattr(self.masking, "name", None) or type(self.masking).__name__
            raise ValueError(
                f"masking={name} needs a net with a masked pass (MDT), but {type(net).__name__} has none; "
                f"use masking=none or an MDT model (e.g. model=mdt_s)."
            )
        if self.masking is None and hasattr(net, "masked_pass_parameters"):
            # The parameters only the masked pass uses get no gradient: frozen, so DDP (no unused-parameter
            # search) and the optimiser skip them; the first training step says so.
            for p in net.masked_pass_parameters():
                p.requires_grad_(False)
            self._warn_unmasked = True

    def training_losses(self, net, x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self._warn_unmasked:
            self._warn_unmasked = False
            warnings.warn(
                f"{type(net).__name__} without masking (masking=none) is plain DiT-style training: only the full "
                "pass runs and the side-interpolater stays frozen; select masking=mdt_v2 (or mdt) for MDT's "
                "masked pass.",
                stacklevel=2,
            )
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device)
        terms = self.diffusion.training_losses(net, x0, t, model_kwargs=dict(cond))
        loss = terms["loss"].mean()
        logged = {k: v.mean() for k, v in terms.items() if k in ("loss", "mse", "vb")}
        if self.masking is not None:
            info = self.masking.sample(x0.shape[0], net.num_tokens, device=x0.device)
            m_terms = self.diffusion.training_losses(net, x0, t, model_kwargs={**cond, "mask": info})
            loss = loss + m_terms["loss"].mean()
            logged.update({f"m_{k}": v.mean() for k, v in m_terms.items() if k in ("loss", "mse", "vb")})
        return loss, logged

    # -- sampling -------------------------------------------------------------------------------
    def check_sampling(self, sampler: str, steps: int, eta: float = 0.0) -> None:
        if sampler in solvers.FAST_SAMPLERS:
            solvers.check_steps(sampler, steps, self.num_timesteps)
        else:
            self.sampling_diffusion(sampler, steps)

    def sampling_diffusion(self, sampler: str, steps: int):
        """The respaced process of ``steps`` steps for ``sampler`` (one sentence for a bad sampler); built once
        per (sampler, steps) and kept, since ``check_sampling`` and ``sample`` both ask for it."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(
                f"sampler={sampler!r} is not a Gaussian-diffusion sampler; use one of {', '.join(SAMPLERS)}."
            )
        cache = self.__dict__.setdefault("_respaced", {})
        key = (sampler, str(steps))
        if key not in cache:
            cache[key] = create_diffusion(("ddim" if sampler == "ddim" else "") + str(steps), **self.adm_settings)
        return cache[key]

    def sample(
        self,
        net,
        shape,
        cond: dict,
        guider: Guider,
        generator: torch.Generator | None = None,
        sampler: str = "ddpm",
        steps: int = 250,
        eta: float = 0.0,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """x0 of ``shape`` for ``cond``; all randomness from ``generator`` (a seed fixes the result)."""
        device = torch.device(device) if device is not None else next(iter(cond.values())).device
        if sampler in solvers.FAST_SAMPLERS:
            solvers.check_steps(sampler, steps, self.num_timesteps)
            scheduler = solvers.make_scheduler(sampler, self.diffusion.betas, steps)
            noise = draw("randn", shape, generator, device)
            eps = solvers.guided_eps(net, guider, cond, channels=shape[1])
            return solvers.solve(scheduler, eps, noise, generator, progress, description=f"{sampler} {steps}")
        diffusion = self.sampling_diffusion(sampler, steps)
        noise = draw("randn", shape, generator, device)
        if guider.enabled:
            noise, cond = guider.double(net, noise, cond)
            model = guider.paired_eps_model(net.forward)
        else:
            model = net.forward
        kwargs = dict(
            noise=noise,
            clip_denoised=False,
            model_kwargs=cond,
            progress=progress,
            generator=generator,
            device=device,
        )
        if sampler == "ddim":
            out = diffusion.ddim_sample_loop(model, noise.shape, eta=eta, **kwargs)
        else:
            out = diffusion.p_sample_loop(model, noise.shape, **kwargs)
        return out[: shape[0]]
