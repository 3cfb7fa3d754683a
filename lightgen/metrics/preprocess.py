"""uint8 images in any of the usual layouts -> the uint8 (N, 3, H, W) tensor torch-fidelity's Inception takes.

The rest of ADM's preprocessing happens inside torch-fidelity's ``FeatureExtractorInceptionV3.forward``: float32,
``interpolate_bilinear_2d_like_tensorflow1x(size=(299, 299), align_corners=False)`` — TF 1.x's legacy
``ResizeBilinear`` (output pixel ``i`` samples the source at ``i * in/out``, no half-pixel centres, no antialiasing),
the resize in ADM's TF graph — then ``(x - 128) / 128``. ``torch.nn.functional.interpolate(mode="bilinear")`` is a
different function (half-pixel centres; tens of grey levels apart at edges on a 32 -> 299 upsample): FID computed
with it is not comparable with published numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from lightgen.utils.errors import LightgenConfigError


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
