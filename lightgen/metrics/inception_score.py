"""Inception Score as ADM's evaluator computes it: softmax over the logits, splits of 5,000 in file order.

``IS = mean over splits of exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the mean prediction of the split.
Splits are consecutive chunks of ``split_size`` samples in the given order (no shuffling, unlike torch-fidelity);
the last chunk may be shorter (ADM: ``range(0, N, 5000)``). With fewer than ``split_size`` samples there is one
split of all of them — ADM does the same; such small-N scores are biased low and are not comparable with IS-50K.
The logits are ADM's (``pool3 @ W``, no bias; all 1008 outputs). Computed in float64 with ``log_softmax``, where ADM
takes ``log`` of a float32 softmax (differences ~1e-6 relative).
"""

from __future__ import annotations

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def inception_score_splits(logits, split_size: int = 5000) -> np.ndarray:
    """The score of each split (consecutive chunks of ``split_size``, the last possibly shorter)."""
    x = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    x = x.detach().cpu().double()
    if x.ndim != 2 or len(x) == 0:
        raise LightgenConfigError(f"Inception Score needs logits of shape (N, classes), got {tuple(x.shape)}.")
    if split_size < 1:
        raise LightgenConfigError(f"split_size must be at least 1, got {split_size}.")
    log_p = torch.log_softmax(x, dim=1)
    scores = []
    for i in range(0, len(x), split_size):
        lp = log_p[i : i + split_size]
        p = lp.exp()
        log_marginal = torch.logsumexp(lp, dim=0) - np.log(len(lp))  # log of the mean prediction
        kl = (p * (lp - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return np.asarray(scores)


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's Inception Score: the mean of :func:`inception_score_splits`."""
    return float(np.mean(inception_score_splits(logits, split_size)))
