"""β (noise) schedules of the ADM / IDDPM diffusion process: the ``conf/schedule`` group's options.

Plain numpy: each schedule returns a float64 array of betas, one per diffusion step, step 0 first.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

# Accepted schedule names; "squaredcos_cap_v2" is the ADM / diffusers name of the cosine schedule.
SCHEDULE_NAMES = ("linear", "cosine", "squaredcos_cap_v2")


def _check_num_steps(num_diffusion_timesteps: int) -> int:
    if isinstance(num_diffusion_timesteps, bool) or int(num_diffusion_timesteps) != num_diffusion_timesteps:
        raise ValueError(f"num_diffusion_timesteps must be an integer, got {num_diffusion_timesteps!r}.")
    num = int(num_diffusion_timesteps)
    if num < 1:
        raise ValueError(f"num_diffusion_timesteps must be at least 1, got {num}.")
    return num


def linear_beta_schedule(num_diffusion_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule (1e-4 -> 0.02 for 1000 steps), rescaled by 1000 / T for other T."""
    num = _check_num_steps(num_diffusion_timesteps)
    scale = 1000.0 / num
    return np.linspace(scale * 1e-4, scale * 0.02, num, dtype=np.float64)


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
    """Nichol & Dhariwal's cumulative signal level at continuous time t in [0, 1]."""
    return math.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), capped at ``max_beta`` so the last steps
    stay finite.
    """
    num = _check_num_steps(num_diffusion_timesteps)
    grid = np.arange(num + 1, dtype=np.float64) / num
    levels = np.array([alpha_bar(float(u)) for u in grid], dtype=np.float64)
    betas = 1.0 - levels[1:] / levels[:-1]
    return np.minimum(betas, max_beta)


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64 numpy, length T) of a named schedule: "linear" or "cosine" ("squaredcos_cap_v2")."""
    if name == "linear":
        return linear_beta_schedule(num_diffusion_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar, max_beta=0.999)
    raise ValueError(f"Unknown noise schedule {name!r}; valid names are: {', '.join(repr(n) for n in SCHEDULE_NAMES)}.")
