"""ImageNet-style class-per-folder images with ADM's preprocessing (as DiT trains)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightgen.data.base import IndexedDataModule
from lightgen.utils.errors import LightgenConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's ``center_crop_arr``: halve with BOX while the short side is at least twice the target,
    resize the short side to ``image_size`` with BICUBIC (rounding the other side), then centre-crop."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of a class-per-folder tree; classes are the sorted folder names (as ImageFolder)."""
    root = Path(root)
    if not root.is_dir():
        raise LightgenConfigError(
            f"image folder {root} does not exist; point data.root at a class-per-folder tree (e.g. ImageNet's train/)."
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files, labels = [], []
    for c, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix in IMAGE_EXTENSIONS)
        files += found
        labels += [c] * len(found)
    if not files:
        raise LightgenConfigError(
            f"no images under {root}: expected one sub-folder per class holding image files (.jpg, .png, ...)."
        )
    return files, np.asarray(labels, dtype=np.int64), classes


class ImageFolderDataset:
    """Images decoded on access, ADM-cropped to ``image_size``, in [-1, 1]; index ``i + N`` is flipped."""

    def __init__(self, files: list[Path], labels: np.ndarray, image_size: int, channels: int = 3):
        self.files, self.labels, self.image_size, self.channels = files, torch.from_numpy(labels), image_size, channels
        self.n = len(files)

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> torch.Tensor:
        try:
            with Image.open(self.files[i]) as img:
                arr = center_crop_arr(img.convert("RGB" if self.channels == 3 else "L"), self.image_size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # truncated, not an image, ...
            raise LightgenConfigError(
                f"{self.files[i]} cannot be read as an image ({type(e).__name__}); replace or remove the file."
            ) from e
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(127.5).sub_(1.0)
        return x.permute(2, 0, 1) if x.ndim == 3 else x[None]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        images = []
        for idx in indices:
            x = self.load(idx % self.n)
            images.append(x.flip(-1) if idx >= self.n else x)
        base = torch.as_tensor(indices, dtype=torch.long) % self.n
        return {"image": torch.stack(images), "label": self.labels[base]}


class ImageFolderDataModule(IndexedDataModule):
    """ImageNet (or any ImageFolder tree): ``data=imagenet data.root=/path/to/train``.

    Same resumable, rank-sharded infinite stream as the other DataModules; random horizontal flips
    (DiT's only augmentation) through the sampler's flip bit. Use ``num_workers`` > 0 for JPEG decoding.
    """

    def __init__(self, root: str, **kwargs):
        kwargs.setdefault("channels", 3)
        super().__init__(**kwargs)
        self.root = root
        self.class_names: list[str] = []

    def check(self) -> None:
        files, labels, classes = scan_image_folder(self.root)
        if len(classes) != self.num_classes:
            raise LightgenConfigError(
                f"{self.root} has {len(classes)} class folders but data.num_classes={self.num_classes}; "
                f"set data.num_classes={len(classes)}."
            )
        self._scan = (files, labels, classes)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            if not hasattr(self, "_scan"):
                self.check()
            files, labels, self.class_names = self._scan
            self.dataset = ImageFolderDataset(files, labels, self.image_size, self.channels)
