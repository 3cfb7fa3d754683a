"""Classifier-free guidance schedules: how the guidance scale varies with the timestep.

* ``constant`` -- DiT: the same scale at every step.
* ``power_cosine`` -- MDT / DiffiT (256 px): ``s(t) = (1 - cos(pi * (1 - t/T) ** scale_pow)) / 2`` and
  ``scale(t) = 1 + (cfg_scale - 1) * s(t)``, so no guidance at ``t = T`` (pure noise) rising to
  ``cfg_scale`` at ``t = 0``. ``t`` is the original-scale timestep (0..T-1, also under respacing),
  ``T`` the number of training steps (1000). ``scale_pow`` 4 is the official default; a large power
  guides only the last steps (more diversity), a small one approaches constant guidance.
"""

from __future__ import annotations

import math

import torch

GUIDANCE_SCHEDULES = ("constant", "power_cosine")


def check_guidance_schedule(schedule: str, scale_pow: float) -> None:
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"cfg_schedule={schedule!r} is not a guidance schedule; use constant (DiT) or power_cosine (MDT, DiffiT)."
        )
    if schedule == "power_cosine" and not float(scale_pow) > 0:
        raise ValueError(f"scale_pow={scale_pow!r} must be positive for the power-cosine schedule (official: 4).")


def power_cosine_scale(t: torch.Tensor, cfg_scale: float, scale_pow: float, num_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample guidance scale of MDT's power-cosine schedule at original timesteps ``t`` (float64 maths)."""
    frac = (1.0 - t.double() / num_timesteps).clamp(min=0.0) ** float(scale_pow)
    s = (1.0 - torch.cos(math.pi * frac)) / 2.0
    return 1.0 + (float(cfg_scale) - 1.0) * s


def guidance_scale(
    t: torch.Tensor, cfg_scale: float, schedule: str = "constant", scale_pow: float = 4.0, num_timesteps: int = 1000
) -> torch.Tensor | float:
    """The guidance scale for timesteps ``t`` under ``schedule`` (a float for ``constant``)."""
    if schedule == "constant":
        return float(cfg_scale)
    if schedule == "power_cosine":
        return power_cosine_scale(t, cfg_scale, scale_pow, num_timesteps)
    check_guidance_schedule(schedule, scale_pow)
    raise AssertionError("unreachable")
