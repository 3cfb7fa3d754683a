"""Gaussian likelihood maths of the ADM / IDDPM diffusion process (in nats, elementwise on tensors).

The KL between Gaussians and the discretised decoder log-likelihood make up the variational bound
(``GaussianDiffusion``'s VLB terms); ``mean_flat`` averages them per sample.
"""

from __future__ import annotations

import math

import torch


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
