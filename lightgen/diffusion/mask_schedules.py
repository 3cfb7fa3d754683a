"""MaskGIT's mask schedules γ(r): the fraction of tokens still masked after a fraction r of decoding.

The official ``maskgit/libml/mask_schedule.py:schedule(ratio, total_unknown, method)``, with lightgen's
names for its methods (``N`` = ``total_unknown``, the number of tokens that can be masked):

========  ==============  ================================
name      official        γ(r)
========  ==============  ================================
cosine    ``cosine``      cos(π r / 2)
linear    ``uniform``     1 − r
square    ``pow2``        1 − r²
cubic     ``pow3``        1 − r³
sqrt      ``pow0.5``      1 − r^0.5
log       ``log``         −log2(r) / log2(N)
exp       ``exp``         1 − 2^(−log2(N) (1 − r))
========  ==============  ================================

clipped to [1e-6, 1] as the official code. Training draws r ~ U[0, 1) per sample and masks ⌈γ(r) L⌉
tokens; decoding step i of T leaves ⌊N γ((i + 1)/T)⌋ tokens masked.

**Precision, as the official JAX code.** JAX computes in float32, but decoding passes a Python float
ratio, whose plain arithmetic (π/2 · r, 1 − r, r^p) runs in float64 before the first ``jnp`` / ``lax``
operation rounds it to float32; training passes a float32 array, so everything is float32. This class
does the same: the arithmetic on ``r`` runs in ``r``'s own dtype (a Python float is float64), and float32
from the first transcendental (cos, log2, exp2) or the clip on. The result is always float32. It
matters: for T = 12 and N = 1024, step 8 gives cos(π/3) = 0.49999997 in float32, so ⌊1024 γ⌋ = 511,
not the 512 of float64 maths.
"""

from __future__ import annotations

import math

import torch

MASK_SCHEDULES = ("cosine", "linear", "square", "cubic", "sqrt", "log", "exp")
_POWERS = {"linear": 1.0, "square": 2.0, "cubic": 3.0, "sqrt": 0.5}
MIN_MASK_RATIO = 1e-6  # the official clip: masking ratios lie in [1e-6, 1]


class MaskSchedule:
    """γ(r) of MaskGIT (see the module docstring): ``MaskSchedule("cosine")(r)``.

    Args:
        name: one of :data:`MASK_SCHEDULES`.
        kind: always ``"mask"`` (the ``schedule`` config group's marker; a Gaussian β schedule is
            ``"gaussian"``).

    ``schedule(r, total_unknown)``: ``r`` a float or a tensor in [0, 1]; ``total_unknown`` (N, an int or
    a tensor broadcasting against ``r``) is needed by ``log`` and ``exp`` only. Returns float32.
    """

    kind = "mask"
    names = MASK_SCHEDULES

    def __init__(self, name: str = "cosine", kind: str = "mask"):
        if name not in MASK_SCHEDULES:
            raise ValueError(f"mask schedule {name!r} is not known; use one of {', '.join(MASK_SCHEDULES)}.")
        if kind != "mask":
            raise ValueError(f"MaskSchedule is a schedule of kind 'mask', not {kind!r}; use kind: mask in its config.")
        self.name = name

    def __repr__(self) -> str:
        return f"MaskSchedule({self.name!r})"

    def __call__(self, r, total_unknown=None) -> torch.Tensor:
        r = r if torch.is_tensor(r) else torch.tensor(float(r), dtype=torch.float64)
        if not r.is_floating_point():
            r = r.double()
        if self.name == "cosine":
            gamma = torch.cos(((math.pi / 2.0) * r).float())
        elif self.name in _POWERS:
            p = _POWERS[self.name]
            gamma = (1.0 - (r if p == 1.0 else r**p)).float()
        else:
            if total_unknown is None:
                raise ValueError(
                    f"the {self.name} mask schedule needs total_unknown (the number of tokens, N); "
                    f"call schedule(r, total_unknown)."
                )
            n = torch.as_tensor(total_unknown, device=r.device).float()
            if self.name == "log":
                gamma = -torch.log2(r.float()) / torch.log2(n)
            else:  # exp
                gamma = 1.0 - torch.exp2(-torch.log2(n) * (1.0 - r).float())
        return gamma.clamp(MIN_MASK_RATIO, 1.0)
