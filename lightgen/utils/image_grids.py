"""Generated images out: [-1, 1] floats to uint8, tiled into PNG grids, sent to loggers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightgen.utils.io import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (N, C, H, W) -> uint8 (N, H, W, C), rounding as DiT's sample_ddp.py (127.5x + 128)."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def make_grid_array(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8-converted images into one (H, W[, C]) array, ``nrow`` images per row."""
    x = to_uint8(images).numpy()
    n, h, w, c = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[y0 : y0 + h, x0 : x0 + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(make_grid_array(images, nrow))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    atomic_write(path, lambda f: img.save(f, format="PNG"))
    return path


def log_image_to_loggers(loggers, key: str, path: str | Path, step: int) -> None:
    """Send a PNG to every logger that takes images (TensorBoard, W&B); CSV keeps the file only."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    arr = np.asarray(Image.open(path))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, arr, step, dataformats="HW" if arr.ndim == 2 else "HWC")
