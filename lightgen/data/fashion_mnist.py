"""Fashion-MNIST from its IDX files (Zalando, 60k train + 10k test, 28x28, 10 classes)."""

from __future__ import annotations

import gzip
import os
import urllib.request
from pathlib import Path

import numpy as np

from lightgen.data.base import IndexedDataModule
from lightgen.utils.errors import LightgenConfigError

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 00 00 08 ndim, big-endian sizes, uint8 data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LightgenConfigError(f"{path} is not a uint8 IDX file (bad magic number); re-download it.")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise LightgenConfigError(f"{path} is truncated ({data.size} of {int(np.prod(shape))} values); re-download it.")
    return data.reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def candidate_dirs(root: str | None, system_dirs=(DEBIAN_DIR,)) -> list[Path]:
    """An explicit ``root`` is the only place searched (a path that is wrong must stop the run, not be replaced
    by another copy); without one, $LIGHTGEN_DATA, then the ``system_dirs`` (data/fashion-mnist, Debian's)."""
    if root:
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs = []
    env = os.environ.get("LIGHTGEN_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    dirs += [Path(d) for d in system_dirs]
    return list(dict.fromkeys(dirs))


def locate(root: str | None, split: str, system_dirs=None) -> tuple[Path, Path]:
    """The image and label files of ``split``, or one clear error saying where we looked."""
    looked = candidate_dirs(root, (DEBIAN_DIR,) if system_dirs is None else system_dirs)
    for d in looked:
        images, labels = _find(d, FILES[split][0]), _find(d, FILES[split][1])
        if images and labels:
            return images, labels
    where = ", ".join(str(d) for d in looked)
    if root:
        raise LightgenConfigError(
            f"data.root={root} does not hold Fashion-MNIST ({split}) (looked in {where}); fix the path, or drop "
            f"data.root to search $LIGHTGEN_DATA, data/fashion-mnist and Debian's copy "
            f"(`apt-get install dataset-fashion-mnist`)."
        )
    raise LightgenConfigError(
        f"Fashion-MNIST ({split}) not found: looked in {where}; install it with "
        f"`apt-get install dataset-fashion-mnist` (or `make data`), point data.root (or $LIGHTGEN_DATA) at "
        f"a folder with the IDX files, or pass data.download=true when online."
    )


def download(root: str | Path) -> None:
    """Fetch the four IDX files from the official URL into ``root`` (atomic per file)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stems in FILES.values():
        for stem in stems:
            target = root / (stem + ".gz")
            if target.exists():
                continue
            tmp = target.with_name(target.name + ".part")
            try:
                urllib.request.urlretrieve(URL + stem + ".gz", tmp)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise LightgenConfigError(
                    f"could not download Fashion-MNIST from {URL} ({e}); install it offline with "
                    f"`apt-get install dataset-fashion-mnist` instead."
                ) from e
            os.replace(tmp, target)


class FashionMNISTDataModule(IndexedDataModule):
    """Fashion-MNIST, padded with black to ``image_size`` (32), labels kept, values in [-1, 1]."""

    def __init__(
        self, root: str | None = None, split: str = "train", download: bool = False, system_dirs=None, **kwargs
    ):
        kwargs.setdefault("channels", 1)
        kwargs.setdefault("num_classes", 10)
        super().__init__(**kwargs)
        if split not in FILES:
            raise LightgenConfigError(f"data.split={split!r} is not a Fashion-MNIST split; use train or test.")
        if self.channels != 1 or self.num_classes != 10:
            raise LightgenConfigError(
                "Fashion-MNIST is 1-channel with 10 classes; remove the data.channels/data.num_classes overrides."
            )
        if self.image_size < 28:
            raise LightgenConfigError(
                f"data.image_size={self.image_size} is smaller than Fashion-MNIST's 28x28 images; use 28 or more."
            )
        self.root = root
        self.split = split
        self.download = download
        self.system_dirs = None if system_dirs is None else list(system_dirs)
        self.class_names = CLASSES

    def check(self) -> None:
        if self.download:
            try:
                locate(self.root, self.split, self.system_dirs)
                return
            except LightgenConfigError:
                download(self.root or os.environ.get("LIGHTGEN_DATA") or "data/fashion-mnist")
                if not self.root:
                    self.root = os.environ.get("LIGHTGEN_DATA") or "data/fashion-mnist"
        locate(self.root, self.split, self.system_dirs)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        self.check()
        images_path, labels_path = locate(self.root, self.split, self.system_dirs)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise LightgenConfigError(
                f"{images_path} holds {images.shape} images for {len(labels)} labels, not N x 28 x 28; re-download it."
            )
        p = self.image_size - 28
        images = np.pad(images, ((0, 0), (p // 2, p - p // 2), (p // 2, p - p // 2)))
        return images[:, None], labels.astype(np.int64)
