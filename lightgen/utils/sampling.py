"""Which samples to draw and with which seeds: shared by ``lightgen.sample`` and the FID callback.

Both cut N samples into fixed batches; batch ``b`` draws all its noise from a generator seeded by
``batch_seed(seed, b)``, so the images depend on the seed and the batch size, never on the number of ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from omegaconf import ListConfig

from lightgen.utils.errors import LightgenConfigError


def make_labels(spec, num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """The labels of all ``num_samples`` samples, a function of (spec, N, K, seed) only."""
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(spec, (list, tuple, ListConfig)):
        classes = torch.tensor([int(c) for c in spec], dtype=torch.long)
        if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
            raise LightgenConfigError(f"labels={list(spec)} must be class indices in [0, {num_classes}).")
        return classes.repeat_interleave(math.ceil(num_samples / len(classes)))[:num_samples]
    if spec == "balanced":
        ordered = torch.arange(num_classes).repeat(math.ceil(num_samples / num_classes))[:num_samples]
        return ordered[torch.randperm(num_samples, generator=gen)]
    if spec == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=gen)
    raise LightgenConfigError(f"labels={spec!r} is not understood; use balanced, uniform or a list of classes.")


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch ``batch``'s generator: independent streams per (seed, batch)."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1, dtype=np.uint64)[0] >> 1)
