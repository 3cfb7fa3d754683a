"""Kernel Inception Distance (Bińkowski et al. 2018), as torch-fidelity computes it.

Unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)³``, averaged over ``subsets`` random subsets
of ``subset_size`` samples drawn without replacement from each set (``np.random.RandomState(seed)``, first set then
second, per subset). The defaults (100 subsets of 1000, seed 2020) are torch-fidelity's, and with the same features
the result is the same numbers; ``subset_size`` is lowered to the smaller set's size when a set has fewer samples.
"""

from __future__ import annotations

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def _as_array(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim != 2:
        raise LightgenConfigError(f"KID features must be (N, D), got shape {x.shape}.")
    return x


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0):
    """Unbiased MMD² between two equally sized sets with the polynomial kernel."""
    m = len(x)
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    k_xx = (x @ x.T * gamma + coef0) ** degree
    k_yy = (y @ y.T * gamma + coef0) ** degree
    k_xy = (x @ y.T * gamma + coef0) ** degree
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return (sum_xx + sum_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    features_1,
    features_2,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD² over random subsets; KID can be slightly negative."""
    x, y = _as_array(features_1), _as_array(features_2)
    if x.shape[1] != y.shape[1]:
        raise LightgenConfigError(f"KID feature dims differ: {x.shape[1]} vs {y.shape[1]}.")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise LightgenConfigError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}.")
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        xs = x[rng.choice(len(x), size, replace=False)]
        ys = y[rng.choice(len(y), size, replace=False)]
        mmds[i] = polynomial_mmd2(xs, ys, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())
