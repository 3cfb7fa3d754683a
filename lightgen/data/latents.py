"""Training on pre-extracted latents (``python -m lightgen.extract``): memory-mapped float16 shards.

Batches are ``{"latent": float32 (B, C, H, W), "label": long (B,)}``; the method skips the
encoder for them (``GenerativeModule.batch_latents``). The stream is the image DataModules' one
(``InfiniteBatchSampler``): a function of the seed and the step, independent of the number of
ranks, so resuming works the same. Index ``i + N`` means "sample ``i`` flipped": with stored flip
pairs (``flips=true`` at extraction) it selects the encoded flipped image; without them the latent
is flipped along its width (exact in pixel space, an approximation for an autoencoder).

The same dataset and DataModule serve token shards (``kind: tokens``, ``lightgen.data.tokens``): the
array kind comes from the manifest, batches are ``{"tokens": long (B, h, w), "label"}``, and a flip
only ever selects the stored tokens of the flipped image (tokens are never flipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightgen.data.base import IndexedDataModule
from lightgen.data.shards import manifest_kind, shard_shape, verify
from lightgen.utils.errors import LightgenConfigError

BACKENDS = ("memmap", "litdata")


class ShardDataset(Dataset):
    """Map-style view of a latent (or token) directory; shards are opened with ``np.load(mmap_mode="r")`` lazily.

    Items: ``{"latent": float32 (C, H, W), "label"}``, or ``{"tokens": int64 (h, w), "label"}`` for a token
    directory (the manifest's ``kind``).

    Opening happens on first access in each process (and again after a fork: DataLoader workers
    never share the parent's file handles). Labels (8 bytes a sample) are loaded into memory.
    """

    def __init__(self, path: str | Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self.flips = bool(manifest["flips"])
        self.kind = manifest_kind(manifest)
        self.key, self.dtype = ("tokens", np.int64) if self.kind == "tokens" else ("latent", np.float32)
        self.shards = sorted(manifest["shards"], key=lambda e: e["start"])
        self.starts = np.array([e["start"] for e in self.shards], dtype=np.int64)
        self.n = int(manifest["num_samples"])
        self.labels = torch.from_numpy(
            np.concatenate([np.load(self.path / e["labels_file"]) for e in self.shards]).astype(np.int64)
        )
        if len(self.labels) != self.n:
            raise LightgenConfigError(
                f"{self.path} lists {self.n} samples but its label shards hold {len(self.labels)}; "
                f"re-run the extraction."
            )
        self._arrays: list[np.ndarray] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.n

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            arrays = []
            for e in self.shards:
                a = np.load(self.path / e["file"], mmap_mode="r")
                if a.shape != shard_shape(self.manifest, e["count"]):
                    raise LightgenConfigError(
                        f"shard {self.path / e['file']} holds {a.shape}, not {shard_shape(self.manifest, e['count'])}; "
                        f"re-run the extraction."
                    )
                arrays.append(a)
            self._arrays, self._pid = arrays, os.getpid()
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrays"], state["_pid"] = None, None  # spawned workers reopen the shards themselves
        return state

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        arrays = self._open()
        idx = np.asarray(indices, dtype=np.int64)
        flip, base = idx >= self.n, idx % self.n
        shard = np.searchsorted(self.starts, base, side="right") - 1
        out = None
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            rows = base[sel] - self.starts[s]
            order = np.argsort(rows, kind="stable")  # sorted reads from the memory map
            rows_sorted = rows[order]
            if self.flips:
                chunk = arrays[s][rows_sorted, flip[sel][order].astype(np.int64)]
            else:
                chunk = arrays[s][rows_sorted]
            if out is None:
                out = np.empty((len(idx), *chunk.shape[1:]), dtype=self.dtype)
            out[sel[order]] = chunk
        latents = torch.from_numpy(out)
        if not self.flips and flip.any():
            if self.kind == "tokens":
                raise ValueError(f"{self.path} holds no tokens of flipped images; extract with flips=true.")
            f = torch.from_numpy(flip)
            latents[f] = latents[f].flip(-1)
        return {self.key: latents, "label": self.labels[torch.from_numpy(base)]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = self.__getitems__([index])
        return {k: v[0] for k, v in out.items()}


LatentShardDataset = ShardDataset  # the name it had before token shards


class LatentDataModule(IndexedDataModule):
    """Pre-extracted latents from ``path`` (written by ``python -m lightgen.extract``).

    Args:
        path: the latent directory (holds ``manifest.json``).
        batch_size: the global batch, split over ranks.
        random_flip: use the flip bit of the sampler (stored flipped view, or a flipped latent).
        expected_first_stage: class path or config of the run's first stage; a directory written by
            another one is refused (one sentence) in ``check()``/``setup()``.
        expected_shape: ``(C, H, W)`` the run's network expects.
        check_hashes: also verify every shard's SHA-256 at start-up (reads the whole directory once).
        backend: ``memmap`` (default) or ``litdata`` (needs ``pip install litdata``): the shards are
            converted once into ``litdata_dir`` (default ``<path>/litdata``) and streamed with a
            ``StreamingDataLoader``, whose state Lightning saves in checkpoints (see
            ``lightgen.data.litdata_backend``).
        litdata_dir: where the litdata backend writes its converted copy.
        image_size, channels: of the source images (for configs that interpolate them); unused here.
        num_classes: checked against the manifest when given.

    Subclasses set ``KIND`` (the manifest kind read) and check their own manifest fields in
    ``_check_manifest`` (``lightgen.data.tokens.TokenDataModule``).
    """

    KIND = "latents"

    def __init__(
        self,
        path: str,
        batch_size: int,
        num_workers: int = 0,
        random_flip: bool = True,
        seed: int = 0,
        backend: str = "memmap",
        expected_first_stage: Any = None,
        expected_shape=None,
        check_hashes: bool = False,
        shuffle: bool = True,
        num_classes: int | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        litdata_dir: str | None = None,
    ):
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            random_flip=random_flip,
            seed=seed,
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            shuffle=shuffle,
        )
        if backend not in BACKENDS:
            raise LightgenConfigError(
                f"data.backend={backend!r} is not a {self.KIND[:-1]} backend; use memmap or litdata."
            )
        self.path = str(path)
        self.backend = backend
        self.expected_first_stage = expected_first_stage
        self.expected_shape = None if expected_shape is None else tuple(int(s) for s in expected_shape)
        self.check_hashes = check_hashes
        self.manifest: dict[str, Any] | None = None
        self.dataset: ShardDataset | None = None
        self.litdata_dir = str(litdata_dir) if litdata_dir else str(Path(self.path) / "litdata")
        self.stream = None  # litdata backend: the StreamingDataset built in setup()

    # -- validation --------------------------------------------------------------------------
    def check(self) -> None:
        """Verify the directory against the run (manifest, first stage, shape, shard files[, checksums])."""
        if self.backend == "litdata":
            os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
            try:
                import litdata  # noqa: F401
            except ImportError:
                raise LightgenConfigError(
                    "data.backend=litdata needs the litdata package; `pip install litdata` or use data.backend=memmap."
                ) from None
        if self.manifest is None:
            manifest = verify(
                self.path, self.expected_first_stage, self.expected_shape, self.check_hashes, kind=self.KIND
            )
            stored = manifest.get("num_classes")
            if self.num_classes is not None and stored is not None and int(stored) != int(self.num_classes):
                raise LightgenConfigError(
                    f"{self.path} holds {self.KIND} of a {stored}-class dataset, but data.num_classes="
                    f"{self.num_classes}; set data.num_classes={stored}."
                )
            self._check_manifest(manifest)
            self.manifest = manifest

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        """Further checks of a subclass (raise one sentence); latents need none."""

    @property
    def latent_channels(self) -> int:
        self.check()
        return int(self.manifest["latent_shape"][0])

    @property
    def latent_size(self) -> int:
        self.check()
        return int(self.manifest["latent_shape"][1])

    @property
    def scale_factor(self) -> float:
        self.check()
        return float(self.manifest.get("scale_factor", 1.0))

    # -- Lightning -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """litdata backend: convert the shards (once per node, before ``setup()`` on every rank)."""
        if self.backend == "litdata":
            self._convert()

    def _convert(self) -> bool:
        from lightgen.data import litdata_backend

        self.check()
        return litdata_backend.convert(self.path, self.manifest, self.litdata_dir, num_workers=1)

    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def setup(self, stage: str | None = None) -> None:
        if self.backend == "litdata":
            if self.stream is None:
                from lightgen.data import litdata_backend

                self._convert()  # a no-op when prepare_data() did it
                if self.num_classes is None:
                    stored = self.manifest.get("num_classes")
                    self.num_classes = (
                        int(stored)
                        if stored is not None
                        else int(
                            max(np.load(Path(self.path) / e["labels_file"]).max() for e in self.manifest["shards"])
                        )
                        + 1
                    )
                self.stream = litdata_backend.make_dataset(
                    self.litdata_dir,
                    self.seed,
                    self.random_flip,
                    bool(self.manifest["flips"]),
                    shuffle=self.shuffle,
                    kind=self.KIND,
                )
            return
        if self.dataset is None:
            self.check()
            self.dataset = ShardDataset(self.path, self.manifest)
            if self.num_classes is None:
                stored = self.manifest.get("num_classes")
                self.num_classes = int(stored) if stored is not None else int(self.dataset.labels.max()) + 1

    def train_dataloader(
        self, start_batch: int | None = None, rank: int | None = None, world_size: int | None = None
    ) -> DataLoader:
        """As the image DataModules' loader; ``rank``/``world_size`` override the trainer's (tests, tools).

        With ``backend=litdata`` it returns the ``StreamingDataLoader`` itself (one epoch per
        iteration, local batch ``batch_size // world``), so Lightning stores its ``state_dict`` in
        checkpoints and restores it on resume; ``start_batch`` is then ignored.
        """
        self.setup()
        if self.backend == "litdata":
            return self._litdata_loader(rank, world_size)
        return super().train_dataloader(start_batch, rank, world_size)

    def _litdata_loader(self, rank: int | None, world_size: int | None):
        from lightgen.data import litdata_backend

        r, world = self._world()
        stream = self.stream
        if rank is not None or world_size is not None:
            r = r if rank is None else rank
            world = world if world_size is None else world_size
            stream = litdata_backend.make_dataset(
                self.litdata_dir,
                self.seed,
                self.random_flip,
                bool(self.manifest["flips"]),
                shuffle=self.shuffle,
                rank=r,
                world_size=world,
                kind=self.KIND,
            )
        if self.batch_size % world:
            raise LightgenConfigError(
                f"data.batch_size={self.batch_size} is the global batch and must be divisible by the "
                f"{world} processes; pick a multiple of {world}."
            )
        return litdata_backend.make_loader(stream, self.batch_size // world, self.num_workers, kind=self.KIND)
