"""On-disk format of pre-extracted latents (float16) or tokens (int16/int32): ``.npy`` shards plus a JSON manifest.

A latent directory holds

* ``latents_r{rank:02d}_{k:05d}.npy``: float16, ``(n, C, H, W)``, or ``(n, 2, C, H, W)`` when both
  horizontal flips were encoded (view 0 = the image, view 1 = the image flipped);
* ``labels_r{rank:02d}_{k:05d}.npy``: int64, ``(n,)``;
* ``manifest_r{rank}.json``: what rank ``rank`` has written so far (one entry per finished shard,
  with its SHA-256), updated after every shard, so an interrupted extraction resumes;
* ``manifest.json``: the merged manifest (``finalize_manifest``), written once every rank is done.
  Its presence means "complete": readers need nothing else.

A token directory (a VQ tokenizer's code indices, ``"kind": "tokens"`` in the manifest) is the same
with ``tokens_r{rank:02d}_{k:05d}.npy``: int16 (int32 past 32,767 codes), ``(n, h, w)`` or
``(n, 2, h, w)`` (view 1 = the tokens of the flipped image); its manifest has ``token_shape``,
``codebook_size`` and ``tokenizer_sha256`` (of the tokenizer's checkpoint file, null without one)
where a latent one has ``latent_shape`` and ``scale_factor``. A manifest without ``kind`` is latents.

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
KINDS = ("latents", "tokens")
_PARTIAL_RE = re.compile(r"manifest_r(\d+)\.json$")


# -- names and small helpers --------------------------------------------------------------------
def shard_files(rank: int, k: int, kind: str = "latents") -> tuple[str, str]:
    """File names (latents or tokens, labels) of shard ``k`` of ``rank``."""
    return f"{kind}_r{rank:02d}_{k:05d}.npy", f"labels_r{rank:02d}_{k:05d}.npy"


def manifest_kind(manifest: Mapping) -> str:
    """``"latents"`` or ``"tokens"`` (manifests without ``kind`` are latents)."""
    return manifest.get("kind", "latents")


def token_dtype(codebook_size: int) -> str:
    """int16 while every code index fits (``codebook_size <= 32767``), else int32."""
    return "int16" if int(codebook_size) <= np.iinfo(np.int16).max else "int32"


def array_shape(manifest: Mapping) -> tuple[int, ...]:
    """The shape of one stored sample: ``latent_shape`` (C, H, W) or ``token_shape`` (h, w)."""
    return tuple(manifest["token_shape"] if manifest_kind(manifest) == "tokens" else manifest["latent_shape"])


def array_dtype(manifest: Mapping) -> str:
    """The dtype of the stored arrays: float16 for latents, the manifest's int dtype for tokens."""
    return manifest["dtype"] if manifest_kind(manifest) == "tokens" else DTYPE


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


_HASHES: dict[tuple, str] = {}


def tokenizer_sha256(checkpoint) -> str | None:
    """SHA-256 of the tokenizer's checkpoint file (None without one); cached per (path, size, mtime)."""
    if checkpoint in (None, ""):
        return None
    path = Path(str(checkpoint)).expanduser()
    if not path.is_file():
        raise LightgenConfigError(
            f"first_stage.checkpoint={checkpoint} is not a file; point it at the tokenizer's checkpoint file."
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


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
    shape = array_shape(manifest)
    return (count, 2, *shape) if manifest["flips"] else (count, *shape)


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


def first_stage_difference(stored: Mapping, expected: Any, ignore: tuple[str, ...] = ()) -> str | None:
    """None if ``expected`` (class path, config or module) is the first stage that made ``stored``, else what differs.

    Compares the class (config ``_target_`` or class path) and, for a config, every scalar setting both
    configs have except machine-local ones (paths, directories, devices, dtypes): two autoencoders of
    the same class with different weights (e.g. sd-vae-ft-ema / ft-mse) differ in such a setting.
    Keys in ``ignore`` are not compared (tokens compare the checkpoint's hash, not its path).
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
            if key.startswith("_") or _LOCAL_KEYS.search(key) or key not in config or key in ignore:
                continue
            if isinstance(value, (str, int, float, bool)) and config[key] != value:
                return f"a first stage with {key}={config[key]!r}, but this run has {key}={value!r}"
    return None


def _check_kind(manifest: Mapping, where, plan: Mapping | None, kind: str | None) -> str:
    """The kind (latents / tokens) the shards hold; one sentence if it is not the one wanted."""
    stored_kind = manifest_kind(manifest)
    want_kind = kind or (manifest_kind(plan) if plan is not None else stored_kind)
    if stored_kind != want_kind:
        if plan is not None:
            raise LightgenConfigError(
                f"{where} holds {stored_kind}, but this first stage makes {want_kind}; extract into another directory."
            )
        raise LightgenConfigError(
            f"{where} holds {stored_kind}, but data={want_kind} reads {want_kind}; use data={stored_kind} with it, or "
            f"extract {want_kind} into another directory."
        )
    return stored_kind


def _check_same_settings(manifest: Mapping, where, plan: Mapping) -> None:
    """One sentence if an extraction is resumed with other settings than the ones it started with."""
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


def check_matches(
    manifest: Mapping,
    where: str | Path,
    expected_first_stage: Any = None,
    expected_shape=None,
    plan: Mapping | None = None,
    kind: str | None = None,
) -> None:
    """Raise one sentence if the shards at ``where`` are another kind (latents / tokens, ``kind`` or the
    plan's), or were made by another first stage / shape (/ plan: tokenizer, settings)."""
    stored_kind = _check_kind(manifest, where, plan, kind)
    tokens = stored_kind == "tokens"
    diff = first_stage_difference(
        manifest.get("first_stage") or {}, expected_first_stage, ignore=("checkpoint",) if tokens else ()
    )
    if diff:
        raise LightgenConfigError(
            f"{where} holds {stored_kind} of {diff}; use the matching first_stage, or extract {stored_kind} for this "
            f"one into another directory."
        )
    if expected_shape is not None and tuple(int(s) for s in expected_shape) != array_shape(manifest):
        if tokens:
            raise LightgenConfigError(
                f"{where} holds tokens on a {'x'.join(map(str, array_shape(manifest)))} grid, but this run's "
                f"tokenizer makes {'x'.join(str(int(s)) for s in expected_shape)}; use the tokenizer and image size "
                f"they were extracted with, or extract again into another directory."
            )
        raise LightgenConfigError(
            f"{where} holds latents of shape {tuple(manifest['latent_shape'])} (C, H, W), but this run expects "
            f"{tuple(int(s) for s in expected_shape)}; use the first stage and image size they were extracted with, "
            f"or extract again into another directory."
        )
    if plan is None:
        return
    if tokens:
        checkpoint = ((plan.get("first_stage") or {}).get("config") or {}).get("checkpoint")
        check_tokenizer(manifest, where, plan["codebook_size"], plan["tokenizer_sha256"], checkpoint=checkpoint)
    elif abs(float(manifest.get("scale_factor", 1.0)) - float(plan["scale_factor"])) > 1e-12:
        raise LightgenConfigError(
            f"{where} holds latents scaled by {manifest.get('scale_factor')}, but this extraction scales by "
            f"{plan['scale_factor']}; extract into another directory."
        )
    _check_same_settings(manifest, where, plan)


def check_tokenizer(
    manifest: Mapping, where: str | Path, codebook_size=None, checkpoint_sha256=None, checkpoint=None
) -> None:
    """Raise one sentence if the tokens at ``where`` come from a tokenizer with another codebook size or
    checkpoint (SHA-256 of its file; ``None`` = no checkpoint, random weights) than the run's.

    ``checkpoint``: the run's checkpoint path, for the message only.
    """
    stored_k = manifest.get("codebook_size")
    if codebook_size is not None and stored_k != int(codebook_size):
        raise LightgenConfigError(
            f"{where} holds tokens of a {stored_k}-code tokenizer, but this run's first stage has {int(codebook_size)} "
            f"codes; use the tokenizer they were extracted with, or extract its tokens into another directory."
        )
    stored = manifest.get("tokenizer_sha256")
    if stored != checkpoint_sha256:

        def name(digest, path=None):
            if digest is None:
                return "no checkpoint (random weights)"
            return f"checkpoint {path + ' ' if path else ''}of SHA-256 {digest[:12]}…"

        stored_path = ((manifest.get("first_stage") or {}).get("config") or {}).get("checkpoint")
        raise LightgenConfigError(
            f"{where} holds tokens of a tokenizer with {name(stored, stored_path)}, but this run's first stage has "
            f"{name(checkpoint_sha256, checkpoint)}; set first_stage.checkpoint to the tokenizer they were "
            f"extracted with, or extract its tokens into another directory."
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
                check_matches(old, self.out, self.plan["first_stage"], array_shape(self.plan), self.plan)
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
            (e["file"], e["sha256"], shard_shape(self.plan, count), array_dtype(self.plan)),
            (e["labels_file"], e["labels_sha256"], (count,), LABEL_DTYPE),
        ):
            p = self.out / name
            if not p.is_file() or _check_npy(p, shape, dtype) is not None or sha256_file(p) != digest:
                return False
        return True

    def write(self, k: int, start: int, latents: np.ndarray, labels: np.ndarray) -> dict:
        count = len(labels)
        latents = np.asarray(latents, dtype=array_dtype(self.plan))
        labels = np.asarray(labels, dtype=LABEL_DTYPE)
        if latents.shape != shard_shape(self.plan, count):
            raise ValueError(
                f"shard {k} of rank {self.rank}: {manifest_kind(self.plan)} {latents.shape} != "
                f"{shard_shape(self.plan, count)}"
            )
        # Forget the entry first: if we die between the two renames, the old checksum must not vouch for new files.
        if self.entries.pop(k, None) is not None:
            self._save(done=False)
        lat_name, lab_name = shard_files(self.rank, k, manifest_kind(self.plan))
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
        check_matches(p, out, head["first_stage"], array_shape(head), head)
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
def read_manifest(out: str | Path, kind: str = "latents") -> dict:
    out = Path(out)
    path = out / MANIFEST
    if not path.is_file():
        partial = (
            " (an extraction was started there but not finished: re-run it to resume)"
            if any(out.glob("manifest_r*.json"))
            else ""
        )
        maker = "tokenizer" if kind == "tokens" else "autoencoder"
        raise LightgenConfigError(
            f"no {MANIFEST} in {out}{partial}; extract {kind} first with "
            f"`python -m lightgen.extract data=<images> first_stage=<{maker}> out={out}`."
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


def verify(
    out: str | Path,
    expected_first_stage: Any = None,
    expected_shape=None,
    check_hashes: bool = True,
    kind: str = "latents",
) -> dict:
    """Check a latent (or token) directory against a run; return its manifest or raise one sentence naming the problem.

    Checks the manifest (present, this format, ``kind``), the first stage and latent shape / token grid
    (when given), that every shard file exists with the right shape, dtype and size, and (``check_hashes``) its SHA-256.
    """
    out = Path(out)
    manifest = read_manifest(out, kind)
    check_matches(manifest, out, expected_first_stage, expected_shape, kind=kind)
    for e in manifest["shards"]:
        for name, shape, dtype, digest in (
            (e["file"], shard_shape(manifest, e["count"]), array_dtype(manifest), e["sha256"]),
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
