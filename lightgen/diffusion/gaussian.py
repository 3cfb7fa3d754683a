"""Discrete-time Gaussian diffusion, faithful to ADM / IDDPM as used by DiT.

Conventions (those of ADM):
- ``t`` is a 0-indexed step: t = 0 means one step of noise, t = T - 1 the last one.
- Schedules and every derived quantity are float64 numpy arrays; they are gathered per sample
  as float32 tensors (float64 when the data is float64), exactly like ADM's ``_extract_into_tensor``.
- The network is any callable ``model(x_t, t, **model_kwargs)``. With a learned variance it returns
  2C channels: the mean parameterisation (ε, x0 or x_{t-1}) then the variance values v.
- The process knows nothing about networks, Lightning or Hydra.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from lightgen.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl

Model = Callable[..., torch.Tensor]


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # the posterior mean of x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise ε


class ModelVarType(enum.Enum):
    """How the reverse-step variance is obtained.

    LEARNED: the network outputs log σ² directly. LEARNED_RANGE: it outputs v in [-1, 1] that
    interpolates log σ² between log β̃_t (v = -1) and log β_t (v = +1). FIXED_SMALL: σ² = β̃_t.
    FIXED_LARGE: σ² = β_t (with β̃_1 at t = 0 for a better decoder likelihood).
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean parameterisation (+ VLB for a learned variance)
    RESCALED_MSE = enum.auto()  # same, VLB term scaled by T / 1000
    KL = enum.auto()  # the variational bound only
    RESCALED_KL = enum.auto()  # the variational bound scaled by T (estimates the full VLB)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


_LEARNED_VARIANCES = (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)
_LOG2 = math.log(2.0)


def parse_mse_loss_weighting(weighting: str | None, min_snr_gamma: float = 5.0) -> tuple[str | None, float]:
    """Normalise the MSE weighting option to (kind, gamma).

    ``None`` / "none" / "constant": no weighting (DiT). "min_snr" uses ``min_snr_gamma``;
    "min_snr_<γ>" (MDTv2's spelling, e.g. "min_snr_5") carries γ in the name.
    """
    if weighting is None or weighting in ("none", "constant"):
        return None, float(min_snr_gamma)
    if isinstance(weighting, str) and (weighting == "min_snr" or weighting.startswith("min_snr_")):
        gamma_text = str(min_snr_gamma) if weighting == "min_snr" else weighting[len("min_snr_") :]
        try:
            gamma = float(gamma_text)
        except ValueError:
            gamma = float("nan")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(
                f"mse_loss_weighting {weighting!r} with min_snr_gamma={min_snr_gamma!r} needs a positive "
                "finite gamma, e.g. 'min_snr' with min_snr_gamma=5.0 or 'min_snr_5'."
            )
        return "min_snr", gamma
    raise ValueError(
        f"Unknown mse_loss_weighting {weighting!r}; valid values are None, 'min_snr' or 'min_snr_<gamma>'."
    )


def _as_enum(cls: type[enum.Enum], value) -> enum.Enum:
    """An enum member from a member or its name (case-insensitive), for config-driven construction."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value.upper() in cls.__members__:
        return cls[value.upper()]
    raise ValueError(f"{value!r} is not a {cls.__name__}; valid names are: {', '.join(cls.__members__)}.")


def _random_normal(shape, *, device, dtype, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise, drawn from ``generator`` when given (on the generator's own device)."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def _descending_steps(num_steps: int, progress: bool, description: str) -> Iterator[int]:
    """T-1, ..., 0, optionally with a Rich progress bar."""
    steps = range(num_steps - 1, -1, -1)
    if not progress:
        yield from steps
        return
    from rich.progress import track

    yield from track(steps, description=description, total=num_steps, transient=True)


def _last_sample(outputs: Iterator[dict]) -> torch.Tensor:
    """Run a progressive sampling loop to its end; the ``"sample"`` of its last step."""
    final = None
    for out in outputs:
        final = out
    return final["sample"]


class GaussianDiffusion:
    """ADM's Gaussian diffusion process over ``len(betas)`` steps.

    :param betas: 1-D sequence of betas in (0, 1], step 0 first.
    :param model_mean_type: a :class:`ModelMeanType` (or its name).
    :param model_var_type: a :class:`ModelVarType` (or its name).
    :param loss_type: a :class:`LossType` (or its name).
    :param mse_loss_weighting: None (DiT) or "min_snr" / "min_snr_<γ>" (MDTv2): the MSE term is
        multiplied by min(SNR, γ) / SNR for ε (and x_{t-1}) prediction, min(SNR, γ) for x0 prediction.
        The VLB term is never weighted.
    :param min_snr_gamma: γ for "min_snr".
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        mse_loss_weighting: str | None = None,
        min_snr_gamma: float = 5.0,
    ):
        self.model_mean_type = _as_enum(ModelMeanType, model_mean_type)
        self.model_var_type = _as_enum(ModelVarType, model_var_type)
        self.loss_type = _as_enum(LossType, loss_type)
        self.mse_loss_weighting, self.min_snr_gamma = parse_mse_loss_weighting(mse_loss_weighting, min_snr_gamma)

        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("every beta must lie in (0, 1]; check the schedule and the number of steps.")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # q(x_t | x_0)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = np.concatenate([self.alphas_cumprod[1:], [0.0]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is clipped to β̃_1 (β_0 when there is a single step).
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[first], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Reverse-step variances.
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.concatenate([[first], betas[1:]])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._tables: dict = {}

    # ------------------------------------------------------------------------------------------
    # plumbing
    # ------------------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tables"] = {}
        return state

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-sample value of the schedule array ``name`` at steps ``t``, shaped [N, 1, ...] to broadcast
        against ``like`` (kept unexpanded so elementwise work stays per-sample).

        Float64 data gets float64 coefficients, everything else float32 (as in ADM).
        """
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (name, t.device, dtype)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=t.device, dtype=dtype)
            self._tables[key] = table
        values = table[t]
        return values.view(-1, *([1] * (like.ndim - 1)))

    def _timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            if t.shape != (x.shape[0],):
                raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}.")
            return t.to(device=x.device, dtype=torch.long)
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)

    def _call_model(self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None):
        """Evaluate the network; :class:`SpacedDiffusion` overrides this to pass the original steps."""
        return model(x, t, **(model_kwargs or {}))

    def _split_output(self, output: torch.Tensor, x: torch.Tensor):
        """(mean part, variance values or None) of a network output."""
        if self.model_var_type in _LEARNED_VARIANCES:
            expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
            if tuple(output.shape) != expected:
                raise ValueError(
                    f"with a learned variance the model must return {expected} (mean and variance "
                    f"channels), got {tuple(output.shape)}."
                )
            return output.split(x.shape[1], dim=1)
        if output.shape != x.shape:
            raise ValueError(f"the model must return {tuple(x.shape)}, got {tuple(output.shape)}.")
        return output, None

    # ------------------------------------------------------------------------------------------
    # forward process
    # ------------------------------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t):
        """(mean, variance, log_variance) of q(x_t | x_0)."""
        t = self._timesteps(t, x_start)
        mean = self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = self._gather("one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        log_variance = self._gather("log_one_minus_alphas_cumprod", t, x_start).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)."""
        t = self._timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, x_start {tuple(x_start.shape)}.")
        return (
            self._gather("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t):
        """(mean, variance, clipped log variance) of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape.")
        t = self._timesteps(t, x_t)
        mean = (
            self._gather("posterior_mean_coef1", t, x_t) * x_start + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._gather("posterior_variance", t, x_t).expand(x_t.shape)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t).expand(x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------------
    # conversions between parameterisations
    # ------------------------------------------------------------------------------------------
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        t = self._timesteps(t, x_t)
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t, pred_xstart: torch.Tensor) -> torch.Tensor:
        t = self._timesteps(t, x_t)
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_xstart_from_xprev(self, x_t: torch.Tensor, t, xprev: torch.Tensor) -> torch.Tensor:
        """Invert the posterior mean: x_0 from a predicted mean of x_{t-1}."""
        t = self._timesteps(t, x_t)
        return (xprev - self._gather("posterior_mean_coef2", t, x_t) * x_t) / self._gather(
            "posterior_mean_coef1", t, x_t
        )

    # ------------------------------------------------------------------------------------------
    # reverse process
    # ------------------------------------------------------------------------------------------
    def _reverse_step_distribution(
        self,
        output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict:
        """p(x_{t-1} | x_t) from a raw network output (no model call)."""
        mean_out, var_out = self._split_output(output, x)

        if self.model_var_type == ModelVarType.LEARNED:
            log_variance = var_out
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.LEARNED_RANGE:
            log_small = self._gather("posterior_log_variance_clipped", t, x)
            log_large = self._gather("log_betas", t, x)
            frac = (var_out + 1.0) / 2.0  # not clamped, as in ADM
            log_variance = frac * log_large + (1.0 - frac) * log_small
            variance = torch.exp(log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            variance = self._gather("fixed_large_variance", t, x)
            log_variance = self._gather("fixed_large_log_variance", t, x)
        else:  # FIXED_SMALL
            variance = self._gather("posterior_variance", t, x)
            log_variance = self._gather("posterior_log_variance_clipped", t, x)

        def finish(x0: torch.Tensor) -> torch.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1.0, 1.0) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = finish(self.predict_xstart_from_xprev(x, t, mean_out))
            mean = mean_out
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = finish(mean_out)
            else:
                pred_xstart = finish(self.predict_xstart_from_eps(x, t, mean_out))
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict:
        """Run the network; p(x_{t-1} | x_t) as dict(mean, variance, log_variance, pred_xstart, extra).

        ``denoised_fn`` is applied to the x_0 prediction before the optional clamp to [-1, 1]. A model
        may return ``(output, extra)``; ``extra`` is passed through. Every tensor has x's shape.
        """
        out = self._p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        out["variance"] = out["variance"].expand(x.shape)
        out["log_variance"] = out["log_variance"].expand(x.shape)
        return out

    def _p_mean_variance(self, model, x, t, clip_denoised, denoised_fn, model_kwargs) -> dict:
        """p_mean_variance with fixed variances left as [N, 1, ...] (cheaper in the samplers)."""
        t = self._timesteps(t, x)
        output = self._call_model(model, x, t, model_kwargs)
        extra = None
        if isinstance(output, tuple):
            output, extra = output
        out = self._reverse_step_distribution(output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One ancestral step: x_{t-1} = mean + σ z (no noise at t = 0). Returns dict(sample, pred_xstart)."""
        t = self._timesteps(t, x)
        out = self._p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = _random_normal(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        keep = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + keep * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict:
        """One DDIM step (Song et al. eq. 12) from step t to the previous kept step."""
        t = self._timesteps(t, x)
        out = self._p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        x0 = out["pred_xstart"]
        # ε is re-derived from the (possibly clipped) x_0 prediction, whatever the network predicts.
        eps = self.predict_eps_from_xstart(x, t, x0)
        abar = self._gather("alphas_cumprod", t, x)
        abar_prev = self._gather("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        mean = x0 * torch.sqrt(abar_prev) + torch.sqrt(1.0 - abar_prev - sigma**2) * eps
        noise = _random_normal(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        keep = (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        return {"sample": mean + keep * sigma * noise, "pred_xstart": x0}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
    ) -> dict:
        """Deterministic DDIM step from t to the next kept step (inversion); eta must be 0."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is only defined for the deterministic path (eta=0).")
        t = self._timesteps(t, x)
        out = self._p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        x0 = out["pred_xstart"]
        eps = self.predict_eps_from_xstart(x, t, x0)
        abar_next = self._gather("alphas_cumprod_next", t, x)
        sample = x0 * torch.sqrt(abar_next) + torch.sqrt(1.0 - abar_next) * eps
        return {"sample": sample, "pred_xstart": x0}

    # ------------------------------------------------------------------------------------------
    # sampling loops
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_device(model, noise, device):
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        parameters = getattr(model, "parameters", None)
        if callable(parameters):
            first = next(iter(parameters()), None)
            if first is not None:
                return first.device
        return torch.device("cpu")

    def _loop(self, step, model, shape, noise, device, progress, generator, description, step_kwargs):
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}.")
        device = self._resolve_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}.")
            x = noise.to(device)
        else:
            x = _random_normal(tuple(shape), device=device, dtype=torch.float32, generator=generator)
        for i in _descending_steps(self.num_timesteps, progress, description):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step(model, x, t, generator=generator, **step_kwargs)
            yield out  # outside no_grad so the caller's grad mode is untouched
            x = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict]:
        """Yield p_sample's dict at every step t = T-1, ..., 0."""
        kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        yield from self._loop(self.p_sample, model, shape, noise, device, progress, generator, "DDPM sampling", kwargs)

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling over every step of this process; returns the final x_0 batch.

        All randomness (the initial noise when ``noise`` is None, and the per-step noise) comes from
        ``generator`` when given, so a seed fixes the result.
        """
        return _last_sample(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, generator
            )
        )

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[dict]:
        """Yield ddim_sample's dict at every step t = T-1, ..., 0."""
        kwargs = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs, eta=eta)
        yield from self._loop(
            self.ddim_sample, model, shape, noise, device, progress, generator, "DDIM sampling", kwargs
        )

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: torch.Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn=None,
        model_kwargs: dict | None = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """DDIM sampling over every step of this process (eta=0: deterministic); returns x_0."""
        return _last_sample(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, model_kwargs, device, progress, eta, generator
            )
        )

    # ------------------------------------------------------------------------------------------
    # losses
    # ------------------------------------------------------------------------------------------
    def _vb_terms_from_output(
        self, output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised
    ) -> dict:
        """One VLB term in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0,
        the discretised-Gaussian decoder NLL of x_0 at t = 0. Returns dict(output [N], pred_xstart)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._reverse_step_distribution(output, x_t, t, clip_denoised=clip_denoised)
        out["log_variance"] = out["log_variance"].expand(x_t.shape)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / _LOG2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LOG2
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def vb_terms_bpd(
        self,
        model: Model,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict:
        """The VLB term at step t (bits per dim) for a network; dict(output [N], pred_xstart)."""
        t = self._timesteps(t, x_t)
        output = self._call_model(model, x_t, t, model_kwargs)
        if isinstance(output, tuple):
            output = output[0]
        return self._vb_terms_from_output(output, x_start, x_t, t, clip_denoised)

    def mse_loss_weight(self, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-sample weight of the MSE term ([N]), or None when the MSE is unweighted."""
        if self.mse_loss_weighting is None:
            return None
        dtype = torch.float32 if like is None else like.dtype
        ref = torch.empty(t.shape[0], device=t.device, dtype=dtype)
        snr = self._gather("snr", t, ref)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        if self.model_mean_type == ModelMeanType.START_X:
            weight = clipped
        else:  # ε (and x_{t-1}) prediction, as MDTv2
            weight = clipped / snr
        return torch.where(snr == 0, torch.ones_like(weight), weight)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """Per-sample training losses at steps ``t`` (shape [N] each); the caller takes ``.mean()``.

        MSE losses (ADM / IDDPM hybrid): "mse" = mean_flat((target - prediction)²) (times the optional
        Min-SNR weight); with a learned variance "vb" = the VLB term in bits computed with the mean
        part detached (so it only trains Σ), scaled by T/1000 for RESCALED_MSE; "loss" = mse + vb.
        KL losses: "loss" = the VLB term (× T for RESCALED_KL), "vb" the unscaled term.
        """
        t = self._timesteps(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            vb = self.vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            loss = vb["output"] * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else vb["output"]
            return {"loss": loss, "vb": vb["output"]}

        output = self._call_model(model, x_t, t, model_kwargs)
        if isinstance(output, tuple):
            output = output[0]
        mean_out, var_out = self._split_output(output, x_t)

        terms = {}
        if var_out is not None:
            # Stop-grad on the mean: the VLB only trains the variance.
            frozen = torch.cat([mean_out.detach(), var_out], dim=1)
            vb = self._vb_terms_from_output(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb

        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        mse = mean_flat((target - mean_out) ** 2)
        weight = self.mse_loss_weight(t, mse)
        if weight is not None:
            mse = weight * mse
        terms["mse"] = mse
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms
