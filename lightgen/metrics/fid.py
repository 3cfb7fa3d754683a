"""Fréchet distance (FID on pool3 features, sFID on ADM's spatial features) and feature statistics.

The distance is ADM's ``FIDStatistics.frechet_distance`` (itself TTUR's), in float64:

    d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))

with ``scipy.linalg.sqrtm`` (``method="eigh"``: the same value from symmetric eigendecompositions, much faster);
when the square root is not finite, ``eps`` (1e-6) is added to both diagonals and it is
recomputed; a complex result whose diagonal has imaginary parts above 1e-3 is an error, smaller ones are dropped.

torch-fidelity's ``fid_statistics_to_metric`` computes the same quantity another way (``eigvals`` of ``S1 S2``,
no eps fallback, no imaginary-part check) and agrees to ~1e-9 relative (tested); lightgen keeps ADM's own steps
because ADM's evaluator is the reference for the published FID/sFID numbers.

Statistics are ``mu = mean`` and ``sigma = np.cov(rowvar=False)`` (unbiased, ddof=1), as ADM. For data that does not
fit in memory or is spread over DDP ranks, :class:`FeatureStatsAccumulator` keeps the sum and the sum of outer
products in float64 (torch tensors, so ``all_reduce`` works on any backend) and gives the same statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from lightgen.utils.errors import LightgenConfigError


def _as_2d_float64(features, name: str = "features") -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise LightgenConfigError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}.")
    return x


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for symmetric PSD S1, S2: S1 S2 is similar to R S2 R (R = S1^1/2), a symmetric PSD matrix."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ sigma2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    ``method="sqrtm"``: ADM's computation (``scipy.linalg.sqrtm``, eps fallback) — the published numbers.
    ``method="eigh"``: the same trace from two symmetric eigendecompositions, exact for PSD covariances (agrees with
    sqrtm to ~1e-12 relative on Inception statistics) and ~30x faster on a CPU at 2048 dims (2.7 s vs 91 s on a
    loaded 2-core machine) — for frequent in-training FID.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise LightgenConfigError(
            f"Feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape} "
            "(compare pool features with pool statistics and spatial with spatial)."
        )
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if method != "sqrtm":
        raise LightgenConfigError(f"Fréchet distance method must be 'sqrtm' (ADM) or 'eigh', got {method!r}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: the product of the covariances is singular; adding {eps} to their diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass
class FeatureStats:
    """Mean and (unbiased) covariance of a feature set; ``count`` = number of samples (None if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int | None = None

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        x = _as_2d_float64(features)
        if len(x) < 2:
            raise LightgenConfigError(f"Feature statistics need at least 2 samples, got {len(x)}.")
        return cls(x.mean(axis=0), np.cov(x, rowvar=False), len(x))

    @property
    def dim(self) -> int:
        return len(self.mu)

    def frechet_distance(self, other: FeatureStats, eps: float = 1e-6, method: str = "sqrtm") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps, method=method)


def fid_from_features(features_1, features_2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """FID (or sFID, on spatial features) between two feature sets (N1, D) and (N2, D)."""
    s1, s2 = FeatureStats.from_features(features_1), FeatureStats.from_features(features_2)
    return s1.frechet_distance(s2, eps, method)


class FeatureStatsAccumulator:
    """Streaming mean/covariance: float64 sums of x and x xᵀ, mergeable and all-reducible across ranks.

    ``update`` per batch on each rank, then ``all_reduce()`` (a collective: every rank calls it, once) and
    ``compute()`` on any rank. Pure torch; ``device`` is where the (D, D) float64 sum lives (use the GPU with NCCL).
    ``shift`` (D,) is subtracted from every feature before summing — pass a rough mean (the same on all ranks, e.g. the
    reference ``mu``) to reduce cancellation in ``S - n mu muᵀ``; the result does not depend on it otherwise.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu", shift=None):
        self.dim = dim
        self.device = torch.device(device)
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        self.shift = None if shift is None else torch.as_tensor(np.asarray(shift), dtype=torch.float64).to(self.device)
        if self.shift is not None and self.shift.shape != (dim,):
            raise LightgenConfigError(f"shift must have shape ({dim},), got {tuple(self.shift.shape)}.")

    def update(self, features) -> FeatureStatsAccumulator:
        x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
        x = x.detach().to(self.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise LightgenConfigError(f"expected features of shape (N, {self.dim}), got {tuple(x.shape)}.")
        if self.shift is not None:
            x = x - self.shift
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer.addmm_(x.t(), x)
        return self

    def merge(self, other: FeatureStatsAccumulator) -> FeatureStatsAccumulator:
        """Add another accumulator's sums (same dim and shift) into this one."""
        if other.dim != self.dim:
            raise LightgenConfigError(f"cannot merge accumulators of dim {self.dim} and {other.dim}.")
        same_shift = (self.shift is None and other.shift is None) or (
            self.shift is not None and other.shift is not None and torch.equal(self.shift, other.shift.to(self.device))
        )
        if not same_shift:
            raise LightgenConfigError("cannot merge accumulators with different shifts.")
        self.count += other.count.to(self.device)
        self.sum += other.sum.to(self.device)
        self.outer += other.outer.to(self.device)
        return self

    def all_reduce(self, group=None) -> FeatureStatsAccumulator:
        """Sum the statistics over all ranks of ``group`` (no-op without an initialised process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([self.count.view(1), self.sum, self.outer.view(-1)])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            self.count.copy_(packed[0])
            self.sum.copy_(packed[1 : 1 + self.dim])
            self.outer.copy_(packed[1 + self.dim :].view(self.dim, self.dim))
        return self

    def compute(self) -> FeatureStats:
        n = int(round(self.count.item()))
        if n < 2:
            raise LightgenConfigError(f"Feature statistics need at least 2 samples, got {n}.")
        mean_shifted = self.sum / n
        cov = (self.outer - n * torch.outer(mean_shifted, mean_shifted)) / (n - 1)
        mu = mean_shifted if self.shift is None else mean_shifted + self.shift
        return FeatureStats(mu.cpu().numpy(), cov.cpu().numpy(), n)

    def reset(self) -> None:
        self.count.zero_()
        self.sum.zero_()
        self.outer.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"count": self.count, "sum": self.sum, "outer": self.outer}
        if self.shift is not None:
            sd["shift"] = self.shift
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.count.copy_(sd["count"])
        self.sum.copy_(sd["sum"])
        self.outer.copy_(sd["outer"])
        self.shift = sd["shift"].to(self.device, torch.float64) if "shift" in sd else None
