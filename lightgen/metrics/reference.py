"""Reference batches in ADM's format, and reading sample images (.npz or a folder of PNG/JPG).

ADM's reference files (``VIRTUAL_imagenet256_labeled.npz`` and friends) are plain ``np.savez`` archives:

* ``arr_0``: uint8 (M, H, W, 3) images (10,000 for ImageNet) — ADM recomputes their pool3 features for
  precision/recall and (from the same call) their Inception Score;
* ``mu``, ``sigma``: float64 (2048,), (2048, 2048) pool3 statistics over the whole reference set;
* ``mu_s``, ``sigma_s``: float64 (2023,), (2023, 2023) spatial (sFID) statistics.

lightgen writes the same keys plus ``lightgen_pool`` (float32 (M, 2048) pool3 features of ``arr_0``, so
precision/recall need no network run) and ``lightgen_count`` (the number of images behind ``mu``/``sigma``). ADM's
evaluator only reads the keys it knows, so lightgen's files work there too. Writes are atomic.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightgen.metrics.fid import FeatureStats, FeatureStatsAccumulator
from lightgen.metrics.inception import NUM_POOL, NUM_SPATIAL
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.io import atomic_write

POOL_KEY = "lightgen_pool"
COUNT_KEY = "lightgen_count"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ReferenceStats:
    """Statistics of a reference set; ``images`` / ``pool_features`` are ``arr_0`` and its pool3 features."""

    pool: FeatureStats
    spatial: FeatureStats
    images: np.ndarray | None = None
    pool_features: np.ndarray | None = None
    path: Path | None = None

    def load_images(self) -> np.ndarray:
        """``arr_0``: the kept images, read from ``path`` on first use."""
        if self.images is None:
            if self.path is None:
                raise LightgenConfigError(
                    "This reference has no images (arr_0) in memory and no file to read them from."
                )
            with np.load(self.path) as z:
                self.images = z["arr_0"]
        return self.images

    def reference_pool_features(self, extractor=None, batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Pool3 features of ``arr_0`` for precision/recall: cached in the file, else computed with ``extractor``."""
        if self.pool_features is None:
            if extractor is None:
                raise LightgenConfigError(
                    f"The reference {self.path or ''} has no cached pool features ({POOL_KEY}); pass an "
                    "InceptionFeatures extractor to compute them from its images (arr_0)."
                )
            from lightgen.metrics.inception import extract_features

            images = self.load_images()
            if len(images) == 0:
                raise LightgenConfigError(f"The reference {self.path or ''} holds no images (arr_0 is empty).")
            self.pool_features = extract_features(images, batch_size, extractor=extractor, progress=progress)["pool"]
        return self.pool_features


def _check_stats(mu: np.ndarray, sigma: np.ndarray, dim: int, name: str, path) -> None:
    """mu (d,) and sigma (d, d); d is the Inception's (2048 pool, 2023 spatial) unless another extractor made them."""
    d = mu.shape[0] if mu.ndim == 1 else -1
    if sigma.shape != (d, d):
        raise LightgenConfigError(
            f"{path}: {name} statistics have shapes {mu.shape} / {sigma.shape}, expected (D,) / (D, D) "
            f"(D = {dim} for the FID Inception)."
        )


def load_reference(path: str | Path, extractor=None, batch_size: int = 64, progress: bool = True) -> ReferenceStats:
    """Read an ADM-format reference ``.npz``; ``arr_0`` stays on disk until needed.

    A file without ``mu``/``sigma`` (a plain image batch) gets its statistics computed from ``arr_0`` with
    ``extractor``, as ADM's ``read_statistics`` does.
    """
    path = Path(path)
    if not path.is_file():
        raise LightgenConfigError(f"Reference statistics file {path} does not exist.")
    try:
        with np.load(path) as z:
            keys = set(z.files)
            if {"mu", "sigma", "mu_s", "sigma_s"} <= keys:
                pool = FeatureStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64))
                spatial = FeatureStats(z["mu_s"].astype(np.float64), z["sigma_s"].astype(np.float64))
                count = int(z[COUNT_KEY]) if COUNT_KEY in keys else None
                pool.count = spatial.count = count
                feats = z[POOL_KEY].astype(np.float64) if POOL_KEY in keys else None
                _check_stats(pool.mu, pool.sigma, NUM_POOL, "pool (mu, sigma)", path)
                _check_stats(spatial.mu, spatial.sigma, NUM_SPATIAL, "spatial (mu_s, sigma_s)", path)
                return ReferenceStats(pool, spatial, pool_features=feats, path=path)
            if "arr_0" not in keys:
                raise LightgenConfigError(
                    f"{path} has neither ADM statistics (mu, sigma, mu_s, sigma_s) nor images (arr_0)."
                )
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise LightgenConfigError(f"Could not read reference statistics {path} as an .npz file ({e}).") from e
    if extractor is None:
        raise LightgenConfigError(
            f"{path} holds images but no statistics (mu, sigma, mu_s, sigma_s); pass an InceptionFeatures extractor to "
            "compute them."
        )
    images, _ = load_images(path)
    return compute_reference(images, extractor, batch_size=batch_size, keep_images=len(images), progress=progress)


def save_reference(path: str | Path, ref: ReferenceStats, compress: bool = False) -> Path:
    """Write ``ref`` in ADM's format (+ lightgen's extra keys), atomically. ``arr_0`` is empty if no images are kept."""
    path = Path(path)
    images = ref.images if ref.images is not None else np.zeros((0, 0, 0, 3), np.uint8)
    arrays = {
        "arr_0": np.asarray(images, dtype=np.uint8),
        "mu": np.asarray(ref.pool.mu, np.float64),
        "sigma": np.asarray(ref.pool.sigma, np.float64),
        "mu_s": np.asarray(ref.spatial.mu, np.float64),
        "sigma_s": np.asarray(ref.spatial.sigma, np.float64),
    }
    if ref.pool_features is not None:
        arrays[POOL_KEY] = np.asarray(ref.pool_features, np.float32)
    if ref.pool.count is not None:
        arrays[COUNT_KEY] = np.asarray(ref.pool.count, np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez
    atomic_write(path, lambda f: save(f, **arrays))
    ref.path = path
    return path


def compute_reference(
    images,
    extractor,
    batch_size: int = 64,
    keep_images: int = 10000,
    progress: bool = True,
    path: str | Path | None = None,
    total: int | None = None,
    description: str = "reference statistics",
    live=None,
) -> ReferenceStats:
    """Statistics of ``images`` (uint8 array or an iterable of uint8 batches), streamed through the network.

    The first ``keep_images`` images become ``arr_0`` (with their pool features cached for precision/recall), as in
    ADM's reference batches (statistics over the whole set, 10,000 images kept). Written to ``path`` when given.
    """
    from lightgen.metrics.inception import _batches, iter_features

    batches, n = _batches(images, batch_size)
    pool_acc = spatial_acc = None
    kept_images: list[np.ndarray] = []
    kept_pool: list[np.ndarray] = []
    n_kept = 0

    def tee():
        nonlocal n_kept
        for batch in batches:
            arr = batch.cpu().numpy() if hasattr(batch, "cpu") else np.asarray(batch)
            if n_kept < keep_images:
                take = arr[: keep_images - n_kept]
                kept_images.append(take)
                n_kept += len(take)
            yield arr

    seen = 0
    for out in iter_features(
        tee(), extractor, batch_size, progress, total if total is not None else n, description, live
    ):
        if pool_acc is None:
            pool_acc = FeatureStatsAccumulator(out["pool"].shape[1])
            spatial_acc = FeatureStatsAccumulator(out["spatial"].shape[1])
        pool_acc.update(out["pool"])
        spatial_acc.update(out["spatial"])
        room = keep_images - seen
        if room > 0:
            kept_pool.append(out["pool"][:room].astype(np.float32))
        seen += len(out["pool"])
    if seen < 2:
        raise LightgenConfigError(f"Reference statistics need at least 2 images, got {seen}.")
    kept = np.concatenate(kept_images) if kept_images else None
    if kept is not None:
        from lightgen.metrics.preprocess import to_nchw_uint8

        kept = to_nchw_uint8(kept).permute(0, 2, 3, 1).contiguous().numpy()  # ADM's arr_0: NHWC, 3 channels
    ref = ReferenceStats(
        pool_acc.compute(),
        spatial_acc.compute(),
        images=kept,
        pool_features=np.concatenate(kept_pool) if kept_pool else None,
    )
    if path is not None:
        save_reference(path, ref)
    return ref


# ------------------------------------------------------------------------------------------------ sample images


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise LightgenConfigError(f"{folder} contains no {'/'.join(IMAGE_SUFFIXES)} images.")
    return files


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _check_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise LightgenConfigError(
            f"{path}: arr_0 must be uint8 images (N, H, W[, C]), got {arr.dtype} {arr.shape}; save samples as uint8 "
            "(ADM's format)."
        )
    return arr


def load_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W, C), labels or None) from a samples ``.npz`` (``arr_0``, optional ``arr_1``) or a
    folder of PNG/JPG files (sorted by file name, converted to RGB, all of one size)."""
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        first = _read_image(files[0])
        images = np.empty((len(files), *first.shape), np.uint8)
        images[0] = first
        for i, f in enumerate(files[1:], start=1):
            img = _read_image(f)
            if img.shape != first.shape:
                raise LightgenConfigError(f"{f} is {img.shape[:2]}, but {files[0]} is {first.shape[:2]}: resize first.")
            images[i] = img
        return images, None
    if not path.is_file():
        raise LightgenConfigError(f"Samples {path} do not exist (expected an .npz with arr_0 or a folder of images).")
    try:
        with np.load(path) as z:
            if "arr_0" not in z.files:
                raise LightgenConfigError(f"{path} has no arr_0 (keys: {sorted(z.files)}).")
            images = _check_uint8(z["arr_0"], path)
            labels = z["arr_1"] if "arr_1" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise LightgenConfigError(f"Could not read samples {path} as an .npz file ({e}).") from e
    return images, labels


def count_images(path: str | Path) -> int:
    """Number of images in a samples ``.npz`` (from the array header, nothing loaded) or an image folder."""
    path = Path(path)
    if path.is_dir():
        return len(_image_files(path))
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            shape, _, _ = _read_npy_header(f)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise LightgenConfigError(f"Could not read arr_0 of {path} ({e}).") from e
    return int(shape[0])


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """(H, W) of the images of a samples/reference ``.npz`` (``arr_0`` header) or an image folder (first file);
    None for a file of statistics only (no images to compare)."""
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        return tuple(_read_image(files[0]).shape[:2]) if files else None
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                return None
            with zf.open("arr_0.npy") as f:
                shape, _, _ = _read_npy_header(f)
    except (OSError, zipfile.BadZipFile):
        return None  # the readers say what is wrong with the file
    return (int(shape[1]), int(shape[2])) if len(shape) >= 3 else None


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise LightgenConfigError(f"unsupported .npy format version {version}")


def iter_image_batches(path: str | Path, batch_size: int = 64) -> Iterator[np.ndarray]:
    """uint8 batches from a samples ``.npz`` (``arr_0`` streamed from the archive, as ADM does) or an image folder,
    without holding the whole set in memory."""
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        for i in range(0, len(files), batch_size):
            yield np.stack([_read_image(f) for f in files[i : i + batch_size]])
        return
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise LightgenConfigError(f"Could not read samples {path} as an .npz file ({e}).") from e
    if "arr_0.npy" not in zf.namelist():
        zf.close()
        raise LightgenConfigError(f"{path} has no arr_0.")
    with zf, zf.open("arr_0.npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran or dtype != np.uint8 or len(shape) not in (3, 4):
            raise LightgenConfigError(
                f"{path}: arr_0 must be C-ordered uint8 images (N, H, W[, C]), got {dtype} {shape}."
            )
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = f.read(count * per_image)
            if len(data) != count * per_image:
                raise LightgenConfigError(f"{path}: arr_0 is truncated at image {start}.")
            yield np.frombuffer(data, np.uint8).reshape(count, *shape[1:])
