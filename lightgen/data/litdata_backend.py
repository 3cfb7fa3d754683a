"""``data.backend=litdata``: the verified memmap shards converted once into litdata's optimized format.

``convert()`` writes ``<path>/litdata/`` (or ``data.litdata_dir``) with ``litdata.optimize``, one item
per sample: ``{"index": int, "latent": float16 (2, C, H, W) or (C, H, W), "label": int}``. The
conversion goes to a temporary sibling directory that is renamed into place only when complete, and
that holds ``lightgen_source.json``: the source manifest's checksums. A killed conversion leaves no
directory under the final name, so it is redone; a source whose checksums changed is converted again.

``make_dataset()`` builds the ``StreamingDataset`` (``shuffle``, ``seed``, ``drop_last=True``); it
detects DDP in its constructor, so call it in ``setup()`` (after the process group exists). The flip
bit of sample ``i`` in epoch ``e`` is a hash of ``(seed, e, i)``: reproducible, independent of the
number of workers and ranks. ``collate()`` returns the memmap backend's batch dict.

Token directories (``kind: tokens``) convert the same way, with items ``{"index", "tokens": int16/int32
(2, h, w) or (h, w), "label"}`` and batches ``{"tokens": long (B, h, w), "label"}``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightgen.data.shards import array_dtype, array_shape, manifest_kind

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

from litdata import StreamingDataLoader, StreamingDataset, optimize  # noqa: E402
from litdata.utilities.env import _DistributedEnv  # noqa: E402

MARKER = "lightgen_source.json"
MARKER_VERSION = 1
_MASK = (1 << 64) - 1


# -- conversion -----------------------------------------------------------------------------------
def source_fingerprint(source: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the converted directory was made from: enough to notice any change of the source."""
    shards = sorted(manifest["shards"], key=lambda e: e["start"])
    return {
        "marker_version": MARKER_VERSION,
        "source": str(Path(source).resolve()),
        "num_samples": int(manifest["num_samples"]),
        "latent_shape": list(array_shape(manifest)),
        "flips": bool(manifest["flips"]),
        "shards": [[e["file"], e["start"], e["count"], e["sha256"], e["labels_sha256"]] for e in shards],
    }


def is_up_to_date(out: str | Path, fingerprint: dict[str, Any]) -> bool:
    out = Path(out)
    try:
        stored = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return stored == fingerprint and (out / "index.json").is_file()


def _item_key(kind: str) -> str:
    return "tokens" if kind == "tokens" else "latent"


def _shard_items(entry: dict[str, Any], source: str, kind: str = "latents", dtype: str = "float16"):
    """``optimize`` worker: one shard -> its samples, in dataset order."""
    latents = np.load(Path(source) / entry["file"], mmap_mode="r")
    labels = np.load(Path(source) / entry["labels_file"])
    for row in range(int(entry["count"])):
        yield {
            "index": int(entry["start"]) + row,
            _item_key(kind): np.ascontiguousarray(latents[row], dtype=dtype),
            "label": int(labels[row]),
        }


def _count_items(out: Path) -> int:
    try:
        index = json.loads((out / "index.json").read_text())
    except (OSError, ValueError):
        return -1
    return sum(int(c["chunk_size"]) for c in index.get("chunks", []))


def convert(
    source: str | Path, manifest: dict[str, Any], out: str | Path, num_workers: int = 1, chunk_bytes: str = "64MB"
) -> bool:
    """Convert the (verified) latent directory ``source`` into ``out`` unless it is up to date.

    Returns True when a conversion ran. Safe against a kill at any point (the final directory
    appears by rename, with its marker inside) and against concurrent converters (the loser
    discards its copy).
    """
    out = Path(out).resolve()
    fingerprint = source_fingerprint(source, manifest)
    if is_up_to_date(out, fingerprint):
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    # optimize() forces the process-wide start method (spawn by default, which re-imports __main__);
    # use fork, as torch's DataLoader does on Linux, and put the previous setting back afterwards.
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        optimize(
            fn=functools.partial(
                _shard_items,
                source=str(Path(source).resolve()),
                kind=manifest_kind(manifest),
                dtype=array_dtype(manifest),
            ),
            inputs=sorted(manifest["shards"], key=lambda e: e["start"]),
            output_dir=str(tmp),
            chunk_bytes=chunk_bytes,
            num_workers=max(1, int(num_workers)),
            reorder_files=False,
            keep_data_ordered=True,
            verbose=False,
            start_method="fork",
        )
        multiprocessing.set_start_method(previous, force=True)
        written = _count_items(tmp)
        if written != int(manifest["num_samples"]):  # optimize() can fail in a worker and still return
            raise RuntimeError(
                f"litdata.optimize wrote {written} of {manifest['num_samples']} samples of {source} into {tmp}; "
                f"see the log above."
            )
        (tmp / MARKER).write_text(json.dumps(fingerprint, indent=1) + "\n")
        stale = None
        if out.exists():
            stale = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.stale")
            os.replace(out, stale)
        try:
            os.replace(tmp, out)
        except OSError:
            if not is_up_to_date(out, fingerprint):  # someone else won the race with the same result: fine
                raise
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        if multiprocessing.get_start_method(allow_none=True) != previous:
            multiprocessing.set_start_method(previous, force=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return True


# -- reading --------------------------------------------------------------------------------------
def flip_bit(seed: int, epoch: int, index: int) -> int:
    """A splitmix64-style hash bit of ``(seed, epoch, index)``."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + 1) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) & 1


class LatentStreamingDataset(StreamingDataset):
    """``StreamingDataset`` whose items are ``(latent float16 (C, H, W), label)`` with the flip applied
    (``kind="tokens"``: ``(tokens (h, w), label)``; tokens are only flipped by selecting a stored view)."""

    def __init__(self, input_dir: str, *, seed: int, random_flip: bool, flips: bool, kind: str = "latents", **kwargs):
        super().__init__(input_dir, seed=seed, **kwargs)
        self.flip_seed = int(seed)
        self.flips = bool(flips)
        self.kind = kind
        self.random_flip = bool(random_flip) and (self.flips or kind != "tokens")

    def __getitem__(self, index):
        item = super().__getitem__(index)
        latent = item[_item_key(self.kind)]
        flip = self.random_flip and flip_bit(self.flip_seed, int(self.current_epoch), int(item["index"]))
        if self.flips:
            latent = latent[int(flip)]
        elif flip:
            latent = latent[..., ::-1]
        return latent, int(item["label"])


def make_dataset(
    path: str | Path,
    seed: int,
    random_flip: bool,
    flips: bool,
    shuffle: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    kind: str = "latents",
) -> LatentStreamingDataset:
    """The stream of ``path``; ``rank``/``world_size`` override the detected process group (tests, tools)."""
    ds = LatentStreamingDataset(
        str(path), seed=seed, random_flip=random_flip, flips=flips, shuffle=shuffle, drop_last=True, kind=kind
    )
    if world_size is not None:
        ds.distributed_env = _DistributedEnv(int(world_size), int(rank or 0), 1)
        ds.drop_last = True
    return ds


def collate(items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """The memmap backend's batch: ``{"latent": float32 (B, C, H, W), "label": long (B,)}``."""
    latents = np.stack([lat for lat, _ in items]).astype(np.float32)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    return {"latent": torch.from_numpy(latents), "label": labels}


def collate_tokens(items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
    """The memmap backend's token batch: ``{"tokens": long (B, h, w), "label": long (B,)}``."""
    tokens = np.stack([t for t, _ in items]).astype(np.int64)
    labels = torch.tensor([lab for _, lab in items], dtype=torch.long)
    return {"tokens": torch.from_numpy(tokens), "label": labels}


def make_loader(
    dataset: StreamingDataset, batch_size: int, num_workers: int = 0, kind: str = "latents"
) -> StreamingDataLoader:
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_tokens if kind == "tokens" else collate,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )
