"""A resumable, infinite, world-size independent batch sampler.

Training is a stream of global batches: epoch ``e`` is a permutation of the dataset drawn from
``seed`` and ``e``; global batch ``k`` is the ``k``-th run of ``global_batch`` indices of that
stream (a partial batch at the end of an epoch is dropped), and rank ``r`` of ``W`` takes the
``r``-th equal slice. So the samples seen at a given step do not depend on the number of ranks,
and resuming at step ``s`` is just starting the stream at batch ``s`` — no state to save beyond
the global step.

With ``random_flip`` an index ``i + n`` means "sample ``i``, horizontally flipped"; the flip bit
comes from the same seeded stream, so flips are reproducible too.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class InfiniteBatchSampler(Sampler[list[int]]):
    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_batch: int = 0,
        shuffle: bool = True,
        random_flip: bool = False,
    ):
        if global_batch % world_size:
            raise ValueError(
                f"data.batch_size={global_batch} is the global batch and must be divisible by the "
                f"{world_size} processes; pick a multiple of {world_size}."
            )
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch}; "
                f"lower data.batch_size."
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start_batch = start_batch
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.batches_per_epoch = num_samples // global_batch
        self.local_batch = global_batch // world_size

    def _epoch(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
        if self.random_flip:
            order = order + self.num_samples * torch.randint(0, 2, (self.num_samples,), generator=g)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        batch = self.start_batch
        epoch, order = None, None
        while True:
            e, k = divmod(batch, self.batches_per_epoch)
            if e != epoch:
                epoch, order = e, self._epoch(e)
            lo = k * self.global_batch + self.rank * self.local_batch
            yield order[lo : lo + self.local_batch].tolist()
            batch += 1
