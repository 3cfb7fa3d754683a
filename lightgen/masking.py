"""Training-time token masking of MDT (``random_masking`` of sail-sg/MDT), outside the network.

:class:`TokenMasking` draws, per training step, which latent tokens each sample keeps; the net's
masked pass (``MDT.forward(x, t, y, mask=info)``) drops the others. MAE-style per-sample shuffle:

* ``noise = rand(N, L)``, ``ids_shuffle = argsort(noise)`` (small = keep), ``ids_restore =
  argsort(ids_shuffle)``, ``ids_keep = ids_shuffle[:, :len_keep]`` with ``len_keep = int(L * (1 - r))``;
* ``mask`` (N, L): 1 = removed, 0 = kept, in the original (un-shuffled) token order.

MDT v1 uses a fixed ``r = ratio`` (0.3 in all scripts: 179 of 256 tokens kept). MDTv2 draws one
``r = ratio + jitter * U(0, 1)`` per batch (``jitter`` 0.2: r in [0.3, 0.5], 128..179 tokens kept).
As in the official code, the v2 ratio is a float32 tensor and ``len_keep`` is computed in float32,
and the v2 ratio is drawn *before* the per-token noise from the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightgen.utils.rng import generator_device

__all__ = ["TokenMask", "TokenMasking", "no_masking"]


@dataclass(frozen=True)
class TokenMask:
    """One draw of :meth:`TokenMasking.sample` for a batch of N samples with L tokens each.

    Attributes:
        ids_keep: (N, len_keep) int64, the kept token indices of each sample (in shuffled order).
        ids_restore: (N, L) int64, un-shuffles ``[kept; removed]`` back to the token order.
        mask: (N, L) float32, 1 = removed, 0 = kept (token order).
        len_keep: number of kept tokens per sample.
        ids_shuffle: (N, L) int64, the per-sample permutation (kept tokens first).
        ratio: the mask ratio used for this batch.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    len_keep: int
    ids_shuffle: torch.Tensor
    ratio: float


class TokenMasking:
    """MDT's random token masking.

    Args:
        ratio: fraction of tokens removed, in [0, 1) (MDT: 0.3).
        jitter: MDTv2's per-batch extra ratio ``jitter * U(0, 1)`` (0.2); 0 gives MDT v1's fixed ratio.
        name: the config name (``mdt`` / ``mdt_v2``), kept for logs only.
    """

    def __init__(self, ratio: float, jitter: float = 0.0, name: str | None = None):
        for key, value in (("ratio", ratio), ("jitter", jitter)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"masking.{key}={value!r} must be a number (e.g. masking.{key}=0.3).")
        if not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"masking.ratio={ratio!r} must be in [0, 1) (MDT uses masking.ratio=0.3).")
        if float(jitter) < 0.0:
            raise ValueError(f"masking.jitter={jitter!r} must be non-negative (MDTv2 uses masking.jitter=0.2).")
        if float(ratio) + float(jitter) >= 1.0:
            raise ValueError(
                f"masking.ratio={ratio!r} plus masking.jitter={jitter!r} must stay below 1 so that tokens remain "
                "visible (MDTv2 uses masking.ratio=0.3 with masking.jitter=0.2)."
            )
        self.ratio = float(ratio)
        self.jitter = float(jitter)
        self.name = name

    def __repr__(self) -> str:
        return f"TokenMasking(ratio={self.ratio}, jitter={self.jitter})"

    def sample(
        self,
        batch_size: int,
        num_tokens: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> TokenMask:
        """Draw the masking of a batch: ``batch_size`` samples of ``num_tokens`` tokens, on ``device``.

        Random numbers come from ``generator`` (drawn on its device, then moved) or, without one, from
        the global stream of ``device`` (as the official code).
        """
        n, length = int(batch_size), int(num_tokens)
        if n <= 0 or length <= 0:
            raise ValueError(
                f"TokenMasking.sample: batch_size={batch_size} and num_tokens={num_tokens} must be positive."
            )
        device = torch.device(device) if device is not None else torch.device("cpu")
        draw_device = generator_device(generator, device)
        if self.jitter > 0:
            # MDTv2: one ratio per batch, a float32 tensor as official (len_keep computed in float32).
            r = torch.rand(1, generator=generator, device=draw_device) * self.jitter + self.ratio
            len_keep = int((length * (1 - r)).item())
            ratio = float(r.item())
        else:
            len_keep = int(length * (1 - self.ratio))
            ratio = self.ratio
        if len_keep < 1:
            raise ValueError(
                f"masking.ratio={ratio:.3f} keeps no token of {length}; lower masking.ratio or use more tokens "
                "(a smaller model.patch_size)."
            )
        noise = torch.rand(n, length, generator=generator, device=draw_device).to(device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(n, length, device=device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return TokenMask(
            ids_keep=ids_keep,
            ids_restore=ids_restore,
            mask=mask,
            len_keep=len_keep,
            ids_shuffle=ids_shuffle,
            ratio=ratio,
        )


def no_masking(**settings) -> None:
    """``masking=none``: no masked pass (DiT, DiffiT). The group's fields (``ratio``) stay readable by configs."""
    return None
