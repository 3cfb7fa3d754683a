"""Evaluation maths and the FID Inception-v3: FID / sFID / IS / KID / precision-recall, ADM reference batches.

Feature extraction follows the TF reference (ADM's evaluator): uint8 images -> TF1 bilinear resize to 299 ->
``(x - 128) / 128`` -> the TF ``inception-2015-12-05`` graph, all three being torch-fidelity's
``FeatureExtractorInceptionV3`` (``lightgen.metrics.inception``) -> pool3 (2048), ADM's spatial sFID features
(2023, a hook on ``Mixed_6d.branch1x1``) and, with torch-fidelity's weights, the 1008 logits.
"""

from lightgen.metrics.adm import compute_adm_metrics
from lightgen.metrics.fid import FeatureStats, FeatureStatsAccumulator, fid_from_features, frechet_distance
from lightgen.metrics.inception import InceptionFeatures, extract_features, iter_features
from lightgen.metrics.inception_score import inception_score, inception_score_splits
from lightgen.metrics.kid import kernel_inception_distance
from lightgen.metrics.precision_recall import manifold_radii, precision_recall
from lightgen.metrics.reference import (
    ReferenceStats,
    compute_reference,
    count_images,
    iter_image_batches,
    load_images,
    load_reference,
    save_reference,
)
from lightgen.metrics.weights import resolve_weights

__all__ = [
    "FeatureStats",
    "FeatureStatsAccumulator",
    "InceptionFeatures",
    "ReferenceStats",
    "compute_adm_metrics",
    "compute_reference",
    "count_images",
    "extract_features",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "inception_score_splits",
    "iter_features",
    "iter_image_batches",
    "kernel_inception_distance",
    "load_images",
    "load_reference",
    "manifold_radii",
    "precision_recall",
    "resolve_weights",
    "save_reference",
]
