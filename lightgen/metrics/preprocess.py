"""Image preprocessing of the TF FID graph: uint8 -> float32 -> TF1 bilinear resize to 299 -> (x - 128) / 128.

ADM's evaluator feeds float32 NHWC images in [0, 255] at the graph's ``ExpandDims:0``; the graph then runs
``ResizeBilinear`` (TF 1.x, ``align_corners=False``, no half-pixel centres) to 299x299 and scales with
``(x - 128) * (1/128)``. :func:`resize_bilinear_tf1` is that resize in torch.

TF1's legacy resize maps output pixel ``i`` to source coordinate ``i * in/out`` (``scale`` a float32), takes the
two neighbours ``floor(src)`` and ``min(floor(src) + 1, in - 1)`` and blends them linearly, rows then columns,
all in float32. ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` is a different function:
it samples at ``(i + 0.5) * in/out - 0.5`` (half-pixel centres) and, with ``antialias=True``, also low-pass filters
when shrinking. On a 32x32 -> 299 upsample the two differ by tens of grey levels at edges; FID computed with
torch's resize is not comparable with published (TF / ADM / torch-fidelity) numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


def _axis(in_size: int, out_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # TF: scale = float(in) / out in float32; src = float(i) * scale in float32.
    scale = torch.tensor(float(in_size), dtype=torch.float32) / torch.tensor(float(out_size), dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = torch.floor(src)
    frac = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(in_size - 1)
    return lo.to(device), hi.to(device), frac.to(device)


def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int] = 299) -> torch.Tensor:
    """TF 1.x ``tf.image.resize_bilinear(align_corners=False)`` of a float (N, C, H, W) tensor, computed in float32."""
    if x.ndim != 4 or not torch.is_floating_point(x):
        raise ValueError(f"resize_bilinear_tf1 expects a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = x.float()
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x  # scale 1: every output pixel is its source pixel, exactly
    y_lo, y_hi, dy = _axis(in_h, out_h, x.device)
    x_lo, x_hi, dx = _axis(in_w, out_w, x.device)
    top_rows, bottom_rows = x.index_select(2, y_lo), x.index_select(2, y_hi)
    dx = dx.view(1, 1, 1, out_w)
    top_left, top_right = top_rows.index_select(3, x_lo), top_rows.index_select(3, x_hi)
    top = top_left + (top_right - top_left) * dx
    bottom_left, bottom_right = bottom_rows.index_select(3, x_lo), bottom_rows.index_select(3, x_hi)
    bottom = bottom_left + (bottom_right - bottom_left) * dx
    return top + (bottom - top) * dy.view(1, 1, out_h, 1)


def to_nchw_uint8(images) -> torch.Tensor:
    """uint8 images (N, H, W, C), (N, C, H, W) or (N, H, W), as numpy or torch, C in {1, 3} -> uint8 (N, 3, H, W).

    Channels-last wins when both readings fit (ADM's ``arr_0`` is NHWC). Grayscale is repeated to 3 channels.
    """
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)
        x = torch.from_numpy(images if images.flags.writeable else images.copy())  # read-only views (mmap, buffers)
    else:
        x = images
    if not isinstance(x, torch.Tensor):
        raise LightgenConfigError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        raise LightgenConfigError(
            f"Inception features take uint8 images in [0, 255], got {x.dtype}; quantise first "
            "(e.g. lightgen.utils.image_grids.to_uint8 for [-1, 1] floats), exactly as the saved samples will be."
        )
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    if x.ndim != 4:
        raise LightgenConfigError(f"images must be (N, H, W, C), (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    if x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] not in (1, 3):
        raise LightgenConfigError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x


def preprocess(images_nchw_uint8: torch.Tensor, size: int = 299) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the graph's input: float32, TF1 bilinear resize to ``size``, ``(x - 128) / 128``."""
    x = resize_bilinear_tf1(images_nchw_uint8.float(), size)
    return (x - 128.0) / 128.0
