"""The global gradient norm, computed once per optimiser step."""

from __future__ import annotations

import torch


def grad_norm(params) -> torch.Tensor | None:
    """L2 norm over every gradient of ``params`` (fp32), with one fused ``_foreach_norm``; None without gradients."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.linalg.vector_norm(torch.stack(norms))
