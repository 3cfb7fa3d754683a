"""Improved precision and recall (Kynkäänniemi et al. 2019) exactly as ADM's evaluator computes them.

ADM (``evaluations/evaluator.py``: ``ManifoldEstimator``, ``DistanceBlock``) on Inception pool3 features:

* squared Euclidean distances ``max(|u|² - 2 u·v + |v|², 0)`` per block of 10,000 x 10,000 rows, computed in
  **float16** (inputs cast to float16); a block with any non-finite value is recomputed in float32; the result is
  float32;
* the radius of each point is the distance to its k-th nearest neighbour within its own set (k = 3), counting the
  point itself as the 0th (``np.partition`` of the row, index k);
* precision = fraction of samples within the radius of some reference point (``d <= r_ref``);
  recall = fraction of reference points within the radius of some sample.

The float16 emulation here: features are rounded to float16, the squared norms and the matrix product are summed in
float32 and rounded to float16 (as a GPU float16 GEMM / reduction does), and each of the two additions is rounded to
float16. TF's kernels may round differently in the last bit, so ties at the radius can flip a handful of points out
of 50,000; ``distance_dtype="float32"`` gives the float32 distances (what ADM falls back to on overflow).

Why not torch-fidelity's ``metric_prc``: its definition is the same (k-th neighbour counting the point itself, ``<=``,
precision over samples, recall over the reference), and with ``distance_dtype="float32"`` the two agree (tested), but
it measures ``torch.cdist`` distances in float32, never ADM's float16 ones, so near-tie points come out differently
from ADM's published precision/recall, and its default path holds the full N x N matrices (50k: 10 GB each) on the
host. The float16 blocks above are what make the numbers ADM's.
"""

from __future__ import annotations

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def _prepare(features, device) -> torch.Tensor:
    x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if x.ndim != 2:
        raise LightgenConfigError(f"precision/recall features must be (N, D), got {tuple(x.shape)}.")
    return x.detach().to(device=device, dtype=torch.float32)


def _distances_fp32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1).unsqueeze(0)
    return torch.clamp(nu - 2 * (u @ v.t()) + nv, min=0.0)


def _distances_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u = u.half().float()
    v = v.half().float()
    nu = (u * u).half().float().sum(1, keepdim=True).half().float()  # square rounded, summed, rounded
    nv = (v * v).half().float().sum(1).half().float().unsqueeze(0)
    uv2 = (2 * (u @ v.t())).half().float()  # 2x is exact in float16 (unless it overflows -> inf -> fallback)
    d = (nu - uv2).half().float()
    d = (d + nv).half().float()
    return torch.clamp(d, min=0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, distance_dtype: str = "float16") -> torch.Tensor:
    """ADM's ``DistanceBlock.pairwise_distances``: squared distances (float32), float16 unless it overflows."""
    if distance_dtype == "float32":
        return _distances_fp32(u, v)
    if distance_dtype != "float16":
        raise LightgenConfigError(f"distance_dtype must be 'float16' (ADM) or 'float32', got {distance_dtype!r}.")
    d = _distances_fp16(u, v)
    if not torch.isfinite(d).all():
        d = _distances_fp32(u, v)
    return d


def manifold_radii(
    features,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    distance_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Distance (squared) from each point to its k-th nearest neighbour in the same set (itself = 0th): (N,) float32."""
    x = _prepare(features, device)
    n = len(x)
    if n <= k:
        raise LightgenConfigError(f"precision/recall with k={k} needs more than {k} points per set, got {n}.")
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for b1 in range(0, n, row_batch_size):
        rows = x[b1 : b1 + row_batch_size]
        dist = torch.cat(
            [
                pairwise_distances(rows, x[b2 : b2 + col_batch_size], distance_dtype)
                for b2 in range(0, n, col_batch_size)
            ],
            dim=1,
        )
        radii[b1 : b1 + len(rows)] = torch.kthvalue(dist, k + 1, dim=1).values
    return radii


def precision_recall(
    reference_features,
    sample_features,
    k: int = 3,
    row_batch_size: int = 10000,
    col_batch_size: int = 10000,
    distance_dtype: str = "float16",
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """(precision, recall) of samples against reference features (N, 2048), ADM's ``compute_prec_recall``."""
    ref = _prepare(reference_features, device)
    sam = _prepare(sample_features, device)
    if ref.shape[1] != sam.shape[1]:
        raise LightgenConfigError(f"feature dims differ: reference {ref.shape[1]}, samples {sam.shape[1]}.")
    kwargs = dict(row_batch_size=row_batch_size, col_batch_size=col_batch_size, distance_dtype=distance_dtype)
    radii_ref = manifold_radii(ref, k, device=device, **kwargs)
    radii_sam = manifold_radii(sam, k, device=device, **kwargs)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)  # reference inside some sample ball
    sam_in = torch.zeros(len(sam), dtype=torch.bool, device=ref.device)  # sample inside some reference ball
    for b1 in range(0, len(ref), row_batch_size):
        r = ref[b1 : b1 + row_batch_size]
        for b2 in range(0, len(sam), col_batch_size):
            s = sam[b2 : b2 + col_batch_size]
            d = pairwise_distances(r, s, distance_dtype)  # (rows of ref, cols of samples)
            ref_in[b1 : b1 + len(r)] |= (d <= radii_sam[b2 : b2 + len(s)].unsqueeze(0)).any(dim=1)
            sam_in[b2 : b2 + len(s)] |= (d <= radii_ref[b1 : b1 + len(r)].unsqueeze(1)).any(dim=0)
    return float(sam_in.double().mean()), float(ref_in.double().mean())
