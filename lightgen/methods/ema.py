"""Exponential moving average of a network's parameters, as DiT keeps it."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(net: nn.Module) -> nn.Module:
    """An exact, frozen copy of ``net`` in eval mode (DiT: ``update_ema(ema, model, decay=0)``)."""
    ema = copy.deepcopy(net)
    ema.requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * net`` for every parameter, frozen ones included (DiT's
    frozen pos_embed is averaged too); buffers are not averaged."""
    ema_params = [p for _, p in sorted(ema.named_parameters())]
    net_params = [p.detach() for _, p in sorted(net.named_parameters())]
    if len(ema_params) != len(net_params):
        raise RuntimeError("EMA and network have different parameters")
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, net_params, alpha=1.0 - decay)
