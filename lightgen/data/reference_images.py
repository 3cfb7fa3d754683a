"""Real images out of a DataModule, as uint8 -- what FID reference statistics are computed from."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def reference_name(datamodule, num_images: int | None, seed: int) -> str:
    """A file-name-safe identity of (dataset, split, size, subset) for caching reference statistics."""
    parts = [type(datamodule).__name__.replace("DataModule", "").lower()]
    for attr in ("split", "image_size"):
        if getattr(datamodule, attr, None) is not None:
            parts.append(str(getattr(datamodule, attr)))
    root = getattr(datamodule, "root", None)
    if root:
        import hashlib

        parts.append(hashlib.sha1(str(root).encode()).hexdigest()[:6])
    parts.append(f"n{num_images or 'all'}")
    parts.append(f"seed{seed}")
    return "_".join(parts)


def count_dataset(datamodule) -> int:
    datamodule.setup()
    return len(datamodule.dataset)


def iter_dataset_images(
    datamodule, num_images: int | None = None, seed: int = 0, batch_size: int = 256
) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, C) batches of ``num_images`` images of the DataModule's dataset (all when None).

    A subset is a seeded random choice (the same for a given seed); no flips. Images come back exactly
    as stored (the datasets map uint8 ``u`` to ``u / 127.5 - 1``; this inverts it with rounding).
    """
    if hasattr(datamodule, "check"):
        datamodule.check()
    datamodule.setup()
    dataset = datamodule.dataset
    n = len(dataset)
    if num_images is not None and not 0 < int(num_images) <= n:
        raise LightgenConfigError(f"asked for {num_images} reference images, but the dataset holds {n}.")
    if num_images is None or int(num_images) == n:
        indices = np.arange(n)
    else:
        indices = np.sort(np.random.default_rng(seed).choice(n, int(num_images), replace=False))
    for start in range(0, len(indices), batch_size):
        batch = dataset.__getitems__(indices[start : start + batch_size].tolist())
        if "image" not in batch:
            raise LightgenConfigError(
                f"{type(datamodule).__name__} yields {sorted(batch)} but no images; FID references need images "
                "(use data=fashion_mnist / imagenet, an image folder, or ADM's reference .npz)."
            )
        x = batch["image"]
        yield ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
