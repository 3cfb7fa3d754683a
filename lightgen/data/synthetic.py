"""Synthetic labelled images for tests and smoke runs (no files, deterministic per seed)."""

from __future__ import annotations

import numpy as np

from lightgen.data.base import IndexedDataModule


def make_synthetic_images(num_samples: int, image_size: int, channels: int, num_classes: int, seed: int = 0):
    """Class ``c`` is a bright square at a class-specific position on a dark, slightly noisy background.

    Simple enough that a tiny model learns it in a few hundred steps, structured enough that
    class-conditional samples are checkable.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(num_samples) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 32, size=(num_samples, channels, image_size, image_size), dtype=np.int64)
    side = max(2, image_size // 4)
    grid = max(1, image_size // side)
    for i, c in enumerate(labels):
        r, q = divmod(int(c) % (grid * grid), grid)
        images[i, :, r * side : (r + 1) * side, q * side : (q + 1) * side] = 224 + (c * 3) % 32
    return images.astype(np.uint8), labels.astype(np.int64)


class SyntheticDataModule(IndexedDataModule):
    def __init__(self, num_samples: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.num_samples = num_samples

    def load(self):
        return make_synthetic_images(self.num_samples, self.image_size, self.channels, self.num_classes, self.seed)
