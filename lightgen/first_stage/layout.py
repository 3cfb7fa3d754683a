"""Memory layout of the frozen convolutional autoencoders (SD VAE, VQGAN) on CUDA."""

from __future__ import annotations

import torch
from torch import nn


def channels_last_on_cuda(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` (and, once, ``module``'s weights) in channels-last (NHWC) when on CUDA and frozen; else ``x`` unchanged.

    With NHWC activations and weights cuDNN runs every convolution on the tensor cores without a layout transpose per
    layer (the usual recipe for VAEs and UNets). Only frozen modules are converted: a trained autoencoder keeps its
    layout, which its optimiser state follows. The CPU keeps NCHW, where the layout would move results by float
    rounding (lightgen's CPU numbers are pinned bit for bit in the tests).
    """
    if not x.is_cuda or x.ndim != 4 or any(p.requires_grad for p in module.parameters()):
        return x
    weight = next((p for p in module.parameters() if p.ndim == 4), None)
    if weight is not None and not weight.is_contiguous(memory_format=torch.channels_last):
        module.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)
