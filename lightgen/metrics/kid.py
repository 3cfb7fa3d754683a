"""Kernel Inception Distance (Bińkowski et al. 2018), computed by torch-fidelity's ``kid_features_to_metric``.

Unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (x·y / d + 1)³``, averaged over ``subsets`` random subsets
of ``subset_size`` samples drawn without replacement from each set (``np.random.RandomState(seed)``, first set then
second, per subset), in the features' dtype (float64 from ``extract_features``). The defaults (100 subsets of 1000,
seed 2020) are torch-fidelity's. lightgen adds only the input checks and lowers ``subset_size`` to the smaller set's
size when a set has fewer samples (torch-fidelity refuses that case).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from lightgen.utils.errors import LightgenConfigError


def _as_array(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    x = np.ascontiguousarray(features)
    if x.ndim != 2:
        raise LightgenConfigError(f"KID features must be (N, D), got shape {x.shape}.")
    return x if x.flags.writeable else x.copy()  # torch.from_numpy warns on read-only (memory-mapped) arrays


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
    out = kid_features_to_metric(
        torch.from_numpy(x),
        torch.from_numpy(y),
        kid_subsets=subsets,
        kid_subset_size=size,
        kid_kernel="poly",
        kid_kernel_poly_degree=degree,
        kid_kernel_poly_gamma=gamma,
        kid_kernel_poly_coef0=coef0,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])
