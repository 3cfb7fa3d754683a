"""Inception Score as ADM's evaluator computes it: softmax over the logits, splits of 5,000 in file order.

``IS = mean over splits of exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the mean prediction of the split.
Splits are consecutive chunks of ``split_size`` samples in the given order (no shuffling, unlike torch-fidelity);
the last chunk may be shorter (ADM: ``range(0, N, 5000)``). With fewer than ``split_size`` samples there is one
split of all of them — ADM does the same; such small-N scores are biased low and are not comparable with IS-50K.
The logits are ADM's (``pool3 @ W``, no bias; all 1008 outputs). Each split's score is torch-fidelity's
``isc_features_to_metric(split, splits=1, shuffle=False)`` (float64 softmax and ``log_softmax``, where ADM takes
``log`` of a float32 softmax: differences ~1e-6 relative). lightgen only cuts the splits: torch-fidelity's own
``splits=K`` cuts N into K near-equal parts after a seeded shuffle, which is not ADM's protocol.
"""

from __future__ import annotations

import numpy as np
import torch
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

from lightgen.utils.errors import LightgenConfigError


def inception_score_splits(logits, split_size: int = 5000) -> np.ndarray:
    """The score of each split (consecutive chunks of ``split_size``, the last possibly shorter)."""
    x = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    x = x.detach().cpu().double()
    if x.ndim != 2 or len(x) == 0:
        raise LightgenConfigError(f"Inception Score needs logits of shape (N, classes), got {tuple(x.shape)}.")
    if split_size < 1:
        raise LightgenConfigError(f"split_size must be at least 1, got {split_size}.")
    scores = [
        isc_features_to_metric(x[i : i + split_size], splits=1, shuffle=False)[KEY_METRIC_ISC_MEAN]
        for i in range(0, len(x), split_size)
    ]
    return np.asarray(scores)


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score: the mean of :func:`inception_score_splits`."""
    return float(np.mean(inception_score_splits(logits, split_size)))
