"""The base of every lightgen DataModule, and the in-memory image dataset of the small ones.

``IndexedDataModule`` streams any indexable dataset (``__getitems__(indices)`` -> a dict of batched
tensors) through :class:`InfiniteBatchSampler`; ``ArrayImageDataset`` holds uint8 arrays in memory and
yields ``{"image": [-1, 1] floats, "label": long}``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightgen.data.sampler import InfiniteBatchSampler
from lightgen.utils.errors import LightgenConfigError


class ArrayImageDataset(Dataset):
    """uint8 images (N, C, H, W) and labels (N,). Index ``i + N`` is image ``i`` flipped."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.n = len(self.labels)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        flip, base = idx >= self.n, idx % self.n
        images = self.images[base].float().div_(127.5).sub_(1.0)
        if flip.any():
            images[flip] = images[flip].flip(-1)
        return {"image": images, "label": self.labels[base]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = self.__getitems__([index])
        return {k: v[0] for k, v in out.items()}


def _identity_collate(batch):
    return batch


class IndexedDataModule(pl.LightningDataModule):
    """Base of the DataModules: a resumable, rank-sharded, infinite stream over an indexable dataset.

    ``self.dataset`` is any dataset with ``__len__`` and ``__getitems__(indices)`` returning a dict of
    batched tensors; index ``i + N`` asks for item ``i`` flipped (the sampler's flip bit). The default
    ``setup()`` holds the uint8 arrays returned by ``load()`` in memory (:class:`ArrayImageDataset`:
    Fashion-MNIST, synthetic); subclasses reading from disk override ``setup()`` instead (image
    folders decode on access, latent shards are memory-mapped). ``check()`` validates the data
    before anything is built (default: nothing to check).

    ``batch_size`` is the global batch: each of W ranks gets ``batch_size / W``. The train loader
    is infinite and starts at the trainer's global step, so resuming continues the same stream.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        random_flip: bool = False,
        seed: int = 0,
        image_size: int = 32,
        channels: int = 1,
        num_classes: int = 10,
        shuffle: bool = True,
    ):
        super().__init__()
        for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise LightgenConfigError(
                    f"data.{name}={value!r} must be a whole number >= {least} (data.batch_size is the global batch)."
                )
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.random_flip = random_flip
        self.seed = seed
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.shuffle = shuffle
        self.dataset = None  # built by setup()

    # -- subclasses ------------------------------------------------------------------------
    def check(self) -> None:
        """Raise LightgenConfigError (one sentence) if the data cannot be found or is wrong."""

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (N, C, H, W) and labels (N,) for the default, in-memory ``setup()``."""
        raise NotImplementedError

    # -- Lightning -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            images, labels = self.load()
            self.dataset = ArrayImageDataset(images, labels)

    def train_dataloader(
        self, start_batch: int | None = None, rank: int | None = None, world_size: int | None = None
    ) -> DataLoader:
        """The infinite training stream of this rank, starting at the trainer's global step.

        ``rank``/``world_size``/``start_batch`` default to the trainer's (tests pass them explicitly).
        """
        self.setup()
        r, world, accumulate = 0, 1, 1
        if self.trainer is not None:
            r, world = self.trainer.global_rank, self.trainer.world_size
            accumulate = self.trainer.accumulate_grad_batches
            if start_batch is None:
                start_batch = self.trainer.global_step * accumulate
        r = r if rank is None else rank
        world = world if world_size is None else world_size
        sampler = InfiniteBatchSampler(
            len(self.dataset),
            self.batch_size,
            rank=r,
            world_size=world,
            seed=self.seed,
            start_batch=start_batch or 0,
            shuffle=self.shuffle,
            random_flip=self.random_flip,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity_collate,
            persistent_workers=self.num_workers > 0,
            # Own generator: creating the loader never draws from the global RNG, so a resumed
            # run's noise stream matches an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed + 7919 * r),
        )
