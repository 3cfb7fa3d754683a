"""Reconstruction metrics of a tokenizer: PSNR and SSIM (torchmetrics) and codebook usage / perplexity.

    stats = ReconstructionStats(codebook_size=512)
    stats.update(originals_uint8, reconstructions_uint8, indices)   # per batch; NHWC or NCHW uint8, (N, h, w) indices
    stats.compute()   # {"psnr", "ssim", "codebook_usage", "codebook_perplexity", "codes_used"}

PSNR and SSIM are computed on the uint8 images scaled to [0, 1] (``data_range=1``) — the images as they would be
saved, the same ones the FID Inception sees — and averaged over images: PSNR is the mean of the per-image
``10 log10(1 / MSE)`` (torchmetrics' ``PeakSignalNoiseRatio(dim=(1, 2, 3))``; an exact reconstruction has an
infinite PSNR), SSIM torchmetrics' ``StructuralSimilarityIndexMeasure`` (Gaussian 11 × 11 window, σ 1.5,
k1 0.01, k2 0.03), mean over images.

Codebook usage is over the whole evaluated set: the histogram of the code indices of all images,
``codebook_usage`` = (codes used at least once) / K and ``codebook_perplexity`` = ``exp(−Σ p log p)`` of the
normalised histogram (``0 log 0 = 0``; K when all codes are equally frequent, 1 when one code is used).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def codebook_usage(counts) -> dict[str, float | int]:
    """Usage (fraction of the K codes used) and perplexity of a code histogram ``counts`` (K,)."""
    c = torch.as_tensor(np.asarray(counts), dtype=torch.float64).flatten()
    if c.numel() == 0 or bool((c < 0).any()):
        raise LightgenConfigError(f"a code histogram needs K >= 1 non-negative counts, got {c.tolist()[:8]}.")
    total = float(c.sum())
    used = int((c > 0).sum())
    if total == 0:
        return {"codebook_usage": 0.0, "codebook_perplexity": 0.0, "codes_used": 0}
    p = c[c > 0] / total
    entropy = float(-(p * p.log()).sum())
    return {"codebook_usage": used / c.numel(), "codebook_perplexity": math.exp(entropy), "codes_used": used}


def _unit_nchw(images) -> torch.Tensor:
    """uint8 (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> float64 (N, C, H, W) in [0, 1]."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise LightgenConfigError(
            f"reconstruction metrics take uint8 (N, H, W, C) or (N, C, H, W) images, got {x.dtype} {tuple(x.shape)}."
        )
    if x.shape[-1] in (1, 3):  # channels-last wins when both readings fit (ADM's NHWC), as for the Inception
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3):
        raise LightgenConfigError(f"reconstruction metrics take 1- or 3-channel images, got {tuple(x.shape)}.")
    return x.double() / 255.0


class ReconstructionStats:
    """Streaming PSNR / SSIM over image pairs and the code histogram of a tokenizer's indices."""

    def __init__(self, codebook_size: int):
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        self.codebook_size = int(codebook_size)
        # float64 states: the sums over a large set stay exact to ~1e-12
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).set_dtype(torch.float64)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).set_dtype(torch.float64)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.long)
        self.num_images = 0

    def update(self, originals, reconstructions, indices: torch.Tensor | None = None) -> ReconstructionStats:
        """One batch: uint8 originals and their reconstructions (same layout), and the code indices (N, h, w)."""
        a, b = _unit_nchw(originals), _unit_nchw(reconstructions)
        if a.shape != b.shape:
            raise LightgenConfigError(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} differ.")
        self.psnr.update(b, a)
        self.ssim.update(b, a)
        self.num_images += len(a)
        if indices is not None:
            self.update_codes(indices)
        return self

    def update_codes(self, indices: torch.Tensor) -> None:
        flat = torch.as_tensor(indices).detach().flatten().long().cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size):
            raise LightgenConfigError(
                f"code indices span [{int(flat.min())}, {int(flat.max())}] but the codebook has {self.codebook_size}."
            )
        self.counts += torch.bincount(flat, minlength=self.codebook_size)

    def compute(self) -> dict[str, float | int]:
        if self.num_images == 0:
            raise LightgenConfigError("no images were reconstructed, so there is nothing to measure.")
        return {
            "psnr": float(self.psnr.compute()),
            "ssim": float(self.ssim.compute()),
            **codebook_usage(self.counts),
        }
