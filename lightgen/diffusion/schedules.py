"""Noise schedules and the Gaussian helpers of the ADM / IDDPM diffusion process.

Everything here is plain numpy / torch: the schedules return float64 numpy arrays of betas
(one per diffusion step, step 0 first), the helpers operate elementwise on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# Accepted schedule names; "squaredcos_cap_v2" is the ADM / diffusers name of the cosine schedule.
SCHEDULE_NAMES = ("linear", "cosine", "squaredcos_cap_v2")


def _check_num_steps(num_diffusion_timesteps: int) -> int:
    if isinstance(num_diffusion_timesteps, bool) or int(num_diffusion_timesteps) != num_diffusion_timesteps:
        raise ValueError(f"num_diffusion_timesteps must be an integer, got {num_diffusion_timesteps!r}.")
    num = int(num_diffusion_timesteps)
    if num < 1:
        raise ValueError(f"num_diffusion_timesteps must be at least 1, got {num}.")
    return num


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule (1e-4 -> 0.02 for 1000 steps), rescaled by 1000 / T for other T."""
    num = _check_num_steps(num_diffusion_timesteps)
    scale = 1000.0 / num
    return np.linspace(scale * 1e-4, scale * 0.02, num, dtype=np.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cumulative signal level at continuous time t in [0, 1]."""
    return math.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` so the last steps
    stay finite.
    """
    num = _check_num_steps(num_diffusion_timesteps)
    grid = np.arange(num + 1, dtype=np.float64) / num
    levels = np.array([alpha_bar(float(u)) for u in grid], dtype=np.float64)
    betas = 1.0 - levels[1:] / levels[:-1]
    return np.minimum(betas, max_beta)


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64 numpy, length T) of a named schedule: "linear" or "cosine" ("squaredcos_cap_v2")."""
    if name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar, max_beta=0.999)
    raise ValueError(f"Unknown noise schedule {name!r}; valid names are: {', '.join(repr(n) for n in SCHEDULE_NAMES)}.")


# ----------------------------------------------------------------------------------------------
# Gaussian helpers (log-likelihoods in nats)
# ----------------------------------------------------------------------------------------------


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension except the first (batch) one."""
    if tensor.ndim <= 1:
        return tensor
    return tensor.mean(dim=tuple(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise with broadcasting, in nats.

    Any argument may be a python float as long as one of them is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument.")

    def as_tensor(a):
        return a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=ref.dtype, device=ref.device)

    mean1, logvar1, mean2, logvar2 = (as_tensor(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM's decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats, elementwise) of 8-bit data scaled to [-1, 1] under a discretised Gaussian.

    Each of the 256 levels owns a bin of half-width 1/255; the two extreme bins extend to -inf / +inf.
    ``log_scales`` is the log standard deviation.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have the same shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)} and {tuple(log_scales.shape)}."
        )
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    centred = x - means
    cdf_upper = approx_standard_normal_cdf(inv_std * (centred + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centred - half_bin))
    tiny = 1e-12
    log_below_upper = torch.log(cdf_upper.clamp(min=tiny))
    log_above_lower = torch.log((1.0 - cdf_lower).clamp(min=tiny))
    log_in_bin = torch.log((cdf_upper - cdf_lower).clamp(min=tiny))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))
