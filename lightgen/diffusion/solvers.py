"""Fast samplers for the Gaussian process, taken from diffusers' schedulers rather than rewritten.

``sampler=dpmpp_2m`` is ``DPMSolverMultistepScheduler`` (DPM-Solver++, second order, multistep), ``unipc`` is
``UniPCMultistepScheduler`` (bh2, second order) and ``euler`` is ``EulerDiscreteScheduler``, each built on the
training process's own betas (``trained_betas``, T of them) with ε prediction and diffusers' defaults otherwise
(``linspace`` spacing from t = T − 1, lower-order final steps, a last step to σ = 0). The loop is the one of
diffusers' pipelines: ``x = noise · init_noise_sigma``; per timestep ``scale_model_input``, the net's ε, ``step``.

The net sees the scheduler's timesteps in the training range (as ADM's respaced samplers pass original
timesteps), guidance is the :class:`~lightgen.diffusion.guidance.Guider`'s (constant, power-cosine or linear in t;
3 or all ε channels) on one batch of N doubled for the forward, and a learned-Σ net gives its ε channels.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from lightgen.diffusion.guidance import Guider

# sampler name -> (diffusers class name, the settings that differ from the class defaults)
FAST_SAMPLERS: dict[str, tuple[str, dict]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def make_scheduler(sampler: str, betas: np.ndarray, steps: int):
    """A fresh diffusers scheduler for ``sampler`` on ``betas`` with ``steps`` timesteps set (schedulers keep the
    multistep history, so one per sampling call)."""
    import diffusers

    name, settings = FAST_SAMPLERS[sampler]
    cls = getattr(diffusers, name)
    scheduler = cls(
        num_train_timesteps=len(betas), trained_betas=np.asarray(betas), prediction_type="epsilon", **settings
    )
    scheduler.set_timesteps(int(steps))
    return scheduler


def check_steps(sampler: str, steps, num_timesteps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"steps={steps!r} does not fit sampler={sampler}: it needs a whole number of steps in [1, {num_timesteps}] "
            f"(the training process's T); e.g. steps=20."
        )


def solve(
    scheduler,
    eps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    progress: bool = False,
    description: str = "sampling",
) -> torch.Tensor:
    """x0 from ``noise`` (N, ...) by ``scheduler``'s steps; ``eps(x, t)`` is the ε of N rows at timesteps ``t``
    (N,) in the training range."""
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    timesteps = scheduler.timesteps
    if progress:
        from rich.progress import track

        timesteps = track(timesteps, description=description, total=len(scheduler.timesteps), transient=True)
    for t in timesteps:
        t_batch = t.to(x.device).expand(x.shape[0])
        x = scheduler.step(eps(scheduler.scale_model_input(x, t), t_batch), t, x, **extra).prev_sample
    return x


def guided_eps(net, guider: Guider, cond: dict, channels: int) -> Callable:
    """``eps(x, t)`` of ``net`` under ``guider``: the first ``channels`` output channels (a learned-Σ net's ε)."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return guider.guided_forward(net.forward, net, x, t, cond)[:, :channels]

    return eps
