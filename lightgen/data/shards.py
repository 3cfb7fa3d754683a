"""On-disk format of pre-extracted latents: float16 ``.npy`` shards plus a JSON manifest.

A latent directory holds

* ``latents_r{rank:02d}_{k:05d}.npy``: float16, ``(n, C, H, W)``, or ``(n, 2, C, H, W)`` when both
  horizontal flips were encoded (view 0 = the image, view 1 = the image flipped);
* ``labels_r{rank:02d}_{k:05d}.npy``: int64, ``(n,)``;
* ``manifest_r{rank}.json``: what rank ``rank`` has written so far (one entry per finished shard,
  with its SHA-256), updated after every shard, so an interrupted extraction resumes;
* ``manifest.json``: the merged manifest (``finalize_manifest``), written once every rank is done.
  Its presence means "complete": readers need nothing else.

Shard ``k`` of rank ``r`` holds the samples ``start .. start + count`` of the source dataset, in
dataset order; the shards sorted by ``start`` are the whole dataset. Every file is written under a
temporary name, fsynced and renamed, so a killed extraction never leaves a half-written file under a
final name, and a file without a manifest entry is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.io import atomic_write

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPE = "float16"
LABEL_DTYPE = "int64"
_PARTIAL_RE = re.compile(r"manifest_r(\d+)\.json$")


# -- names and small helpers --------------------------------------------------------------------
def shard_files(rank: int, k: int) -> tuple[str, str]:
    """File names (latents, labels) of shard ``k`` of ``rank``."""
    return f"latents_r{rank:02d}_{k:05d}.npy", f"labels_r{rank:02d}_{k:05d}.npy"


def partial_manifest_name(rank: int) -> str:
    return f"manifest_r{rank}.json"


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous, deterministic slice ``[lo, hi)`` of the dataset that ``rank`` of ``world_size`` extracts."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def rank_shards(num_samples: int, rank: int, world_size: int, shard_size: int) -> list[tuple[int, int]]:
    """``(start, count)`` of every shard of ``rank``, in order."""
    lo, hi = rank_range(num_samples, rank, world_size)
    return [(s, min(shard_size, hi - s)) for s in range(lo, hi, shard_size)]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


def write_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    atomic_write(Path(path), lambda f: np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False))


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an ``.npy`` file, read from its header only."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), np.dtype(dtype), f.tell()


def _check_npy(path: Path, shape: tuple[int, ...], dtype: str) -> str | None:
    """None if ``path`` is a complete ``.npy`` of ``shape``/``dtype``, else why not (a clause)."""
    try:
        got_shape, got_dtype, offset = npy_header(path)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return f"has no valid .npy header ({type(e).__name__})"
    if got_shape != tuple(shape) or got_dtype != np.dtype(dtype):
        return f"holds {got_dtype} {got_shape}, not {dtype} {tuple(shape)}"
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != expected:
        return (
            f"is {size} bytes instead of {expected} (truncated)"
            if size < expected
            else f"is {size} bytes, not {expected}"
        )
    return None


def shard_shape(manifest: Mapping, count: int) -> tuple[int, ...]:
    return (count, 2, *manifest["latent_shape"]) if manifest["flips"] else (count, *manifest["latent_shape"])


# -- compatibility of a directory with a run ----------------------------------------------------
def first_stage_target(spec: Any) -> str | None:
    """The class path that identifies a first stage: a string, a config with ``_target_``, or a module."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return spec.get("_target_") or spec.get("target") or spec.get("class")
    cls = type(spec)
    return f"{cls.__module__}.{cls.__qualname__}"


def _locate(path: str):
    """The object a dotted path names (re-exports included), or None when it cannot be imported."""
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr, None) if module else None
    except Exception:  # noqa: BLE001 - any import failure just means "cannot tell"
        return None


_LOCAL_KEYS = re.compile(r"dir|path|cache|device|dtype|local|root|file", re.IGNORECASE)


def first_stage_difference(stored: Mapping, expected: Any) -> str | None:
    """None if ``expected`` (class path, config or module) is the first stage that made ``stored``, else what differs.

    Compares the class (config ``_target_`` or class path) and, for a config, every scalar setting both
    configs have except machine-local ones (paths, directories, devices, dtypes): two autoencoders of
    the same class with different weights (e.g. sd-vae-ft-ema / ft-mse) differ in such a setting.
    """
    want = first_stage_target(expected)
    if want is None:
        return None
    names = {stored.get("target"), stored.get("class")} - {None}
    if want not in names and (_locate(want) is None or _locate(want) not in {_locate(n) for n in names}):
        return f"first stage {stored.get('target') or stored.get('class')}, but this run uses {want}"
    if isinstance(expected, Mapping):
        config = stored.get("config") or {}
        if "_target_" not in expected and isinstance(expected.get("config"), Mapping):
            expected = expected["config"]  # the "first_stage" entry of another manifest
        for key, value in expected.items():
            if key.startswith("_") or _LOCAL_KEYS.search(key) or key not in config:
                continue
            if isinstance(value, (str, int, float, bool)) and config[key] != value:
                return f"a first stage with {key}={config[key]!r}, but this run has {key}={value!r}"
    return None


def check_matches(
    manifest: Mapping,
    where: str | Path,
    expected_first_stage: Any = None,
    expected_shape=None,
    plan: Mapping | None = None,
) -> None:
    """Raise one sentence if the latents at ``where`` were made by another first stage / shape (/ plan)."""
    diff = first_stage_difference(manifest.get("first_stage") or {}, expected_first_stage)
    if diff:
        raise LightgenConfigError(
            f"{where} holds latents of {diff}; use the matching first_stage, or extract latents for this one into "
            f"another directory."
        )
    if expected_shape is not None and tuple(int(s) for s in expected_shape) != tuple(manifest["latent_shape"]):
        raise LightgenConfigError(
            f"{where} holds latents of shape {tuple(manifest['latent_shape'])} (C, H, W), but this run expects "
            f"{tuple(int(s) for s in expected_shape)}; use the first stage and image size they were extracted with, "
            f"or extract again into another directory."
        )
    if plan is None:
        return
    if abs(float(manifest.get("scale_factor", 1.0)) - float(plan["scale_factor"])) > 1e-12:
        raise LightgenConfigError(
            f"{where} holds latents scaled by {manifest.get('scale_factor')}, but this extraction scales by "
            f"{plan['scale_factor']}; extract into another directory."
        )
    for key, what in (
        ("num_samples", "samples"),
        ("flips", "flips"),
        ("world_size", "processes"),
        ("shard_size", "shard_size"),
        ("seed", "seed"),
    ):
        if manifest.get(key) != plan.get(key):
            raise LightgenConfigError(
                f"{where} was extracted with {what}={manifest.get(key)}, not {plan.get(key)}; re-run with the same "
                f"settings to resume it, or extract into another directory."
            )


# -- writing -------------------------------------------------------------------------------------
class ShardWriter:
    """Writes the shards of one rank and its partial manifest ``manifest_r{rank}.json``.

    ``plan`` is the manifest header every rank shares (first stage, scale factor, latent shape,
    flips, num_samples, world_size, shard_size, ...). ``complete(k, start, count)`` says whether
    shard ``k`` is already on disk, listed in the partial manifest and intact (checksum verified);
    ``write(k, start, latents, labels)`` writes it atomically and records it.
    """

    def __init__(self, out: str | Path, rank: int, plan: Mapping):
        self.out = Path(out)
        self.rank = rank
        self.plan = dict(plan)
        self.path = self.out / partial_manifest_name(rank)
        self.entries: dict[int, dict] = {}
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, ValueError):
                old = None  # a partial manifest is always written atomically; unreadable means foreign
            if isinstance(old, Mapping):
                check_matches(old, self.out, self.plan["first_stage"], self.plan["latent_shape"], self.plan)
                self.entries = {int(e["index"]): e for e in old.get("shards", [])}

    def remove_stale_tmp(self) -> None:
        """Delete this rank's leftovers of an interrupted write (``*.tmp``)."""
        for p in self.out.glob(f"*_r{self.rank:02d}_*.tmp"):
            p.unlink(missing_ok=True)
        for p in self.out.glob(f"{partial_manifest_name(self.rank)}.*.tmp"):
            p.unlink(missing_ok=True)

    def complete(self, k: int, start: int, count: int) -> bool:
        e = self.entries.get(k)
        if e is None or e["start"] != start or e["count"] != count:
            return False
        for name, digest, shape, dtype in (
            (e["file"], e["sha256"], shard_shape(self.plan, count), DTYPE),
            (e["labels_file"], e["labels_sha256"], (count,), LABEL_DTYPE),
        ):
            p = self.out / name
            if not p.is_file() or _check_npy(p, shape, dtype) is not None or sha256_file(p) != digest:
                return False
        return True

    def write(self, k: int, start: int, latents: np.ndarray, labels: np.ndarray) -> dict:
        count = len(labels)
        latents = np.asarray(latents, dtype=DTYPE)
        labels = np.asarray(labels, dtype=LABEL_DTYPE)
        if latents.shape != shard_shape(self.plan, count):
            raise ValueError(
                f"shard {k} of rank {self.rank}: latents {latents.shape} != {shard_shape(self.plan, count)}"
            )
        # Forget the entry first: if we die between the two renames, the old checksum must not vouch for new files.
        if self.entries.pop(k, None) is not None:
            self._save(done=False)
        lat_name, lab_name = shard_files(self.rank, k)
        write_npy_atomic(self.out / lat_name, latents)
        write_npy_atomic(self.out / lab_name, labels)
        entry = {
            "file": lat_name,
            "labels_file": lab_name,
            "rank": self.rank,
            "index": k,
            "start": int(start),
            "count": int(count),
            "sha256": sha256_file(self.out / lat_name),
            "labels_sha256": sha256_file(self.out / lab_name),
        }
        self.entries[k] = entry
        self._save(done=False)
        return entry

    def finish(self, num_shards: int) -> None:
        """Mark this rank done (every one of its ``num_shards`` shards is written)."""
        self._save(done=True, num_shards=num_shards)

    def _save(self, done: bool, num_shards: int | None = None) -> None:
        obj = {**self.plan, "rank": self.rank, "done": done, "shards": [self.entries[k] for k in sorted(self.entries)]}
        if num_shards is not None:
            obj["num_shards"] = num_shards
        write_json_atomic(self.path, obj)


def read_partial_manifests(out: str | Path) -> dict[int, dict]:
    out = Path(out)
    result = {}
    for p in out.glob("manifest_r*.json"):
        m = _PARTIAL_RE.search(p.name)
        if m:
            try:
                result[int(m.group(1))] = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise LightgenConfigError(
                    f"{p} is not valid JSON ({e}); delete it to re-extract that rank's shards."
                ) from e
    return result


def finalize_manifest(out: str | Path, world_size: int | None = None) -> dict | None:
    """Merge the per-rank manifests into ``manifest.json`` once every rank is done.

    Returns the manifest, or None when some rank has not finished yet (so the last rank to finish
    writes it; calling it from several ranks is safe). Raises if the ranks disagree.
    """
    out = Path(out)
    partials = read_partial_manifests(out)
    if not partials:
        return None
    world = world_size or next(iter(partials.values()))["world_size"]
    if any(r not in partials or not partials[r].get("done") for r in range(world)):
        return None
    head = {k: v for k, v in partials[0].items() if k not in ("rank", "done", "shards", "num_shards")}
    shards = []
    for r in range(world):
        p = partials[r]
        check_matches(p, out, head["first_stage"], head["latent_shape"], head)
        if len(p["shards"]) != p.get("num_shards", len(p["shards"])):
            return None
        shards += p["shards"]
    shards.sort(key=lambda e: e["start"])
    pos = 0
    for e in shards:
        if e["start"] != pos:
            raise LightgenConfigError(
                f"the shards in {out} do not cover the dataset contiguously (expected sample {pos}, {e['file']} starts "
                f"at {e['start']}); re-run the extraction to fill the gap."
            )
        pos += e["count"]
    if pos != head["num_samples"]:
        raise LightgenConfigError(
            f"the shards in {out} hold {pos} of {head['num_samples']} samples; re-run the extraction to finish it."
        )
    manifest = {**head, "format_version": FORMAT_VERSION, "shards": shards}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


# -- reading and verification -------------------------------------------------------------------
def read_manifest(out: str | Path) -> dict:
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        partial = (
            " (an extraction was started there but not finished: re-run it to resume)"
            if any(out.glob("manifest_r*.json"))
            else ""
        )
        raise LightgenConfigError(
            f"no {MANIFEST} in {out}{partial}; extract latents first with "
            f"`python -m lightgen.extract data=<images> first_stage=<autoencoder> out={out}`."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LightgenConfigError(f"{path} is not valid JSON ({e}); re-run the extraction to rewrite it.") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LightgenConfigError(
            f"{path} has latent format version {version}, this lightgen reads version {FORMAT_VERSION}; "
            f"extract the latents again with this version."
        )
    return manifest


def verify(out: str | Path, expected_first_stage: Any = None, expected_shape=None, check_hashes: bool = True) -> dict:
    """Check a latent directory against a run; return its manifest or raise one sentence naming the problem.

    Checks the manifest (present, this format), the first stage and latent shape (when given), that
    every shard file exists with the right shape, dtype and size, and (``check_hashes``) its SHA-256.
    """
    out = Path(out)
    manifest = read_manifest(out)
    check_matches(manifest, out, expected_first_stage, expected_shape)
    for e in manifest["shards"]:
        for name, shape, dtype, digest in (
            (e["file"], shard_shape(manifest, e["count"]), DTYPE, e["sha256"]),
            (e["labels_file"], (e["count"],), LABEL_DTYPE, e["labels_sha256"]),
        ):
            p = out / name
            if not p.is_file():
                raise LightgenConfigError(
                    f"shard {p} listed in {out / MANIFEST} is missing; re-run the extraction into {out} "
                    f"to recompute it."
                )
            problem = _check_npy(p, shape, dtype)
            if problem:
                raise LightgenConfigError(
                    f"shard {p} {problem}; delete it and re-run the extraction into {out} to recompute it."
                )
            if check_hashes and sha256_file(p) != digest:
                raise LightgenConfigError(
                    f"shard {p} does not match its checksum in {out / MANIFEST} (corrupted or modified); delete it and "
                    f"re-run the extraction into {out} to recompute it."
                )
    return manifest
