"""Classifier-free guidance as one part: a scale schedule and a combination rule (after ``sgm``'s guiders).

A :class:`Guider` is built from the sampling settings and handed to a process's ``sample``; nets only
provide their conditional forward and a null class (``net.null_class``). Two questions make a guider:

**How the scale moves over the steps** (``schedule``; ``t`` is the original-scale timestep 0..T-1, also
under respacing, and ``T`` the number of training steps):

* ``constant`` -- DiT: ``scale`` at every step.
* ``power_cosine`` -- MDT / DiffiT (256 px): ``s(t) = (1 - cos(pi * (1 - t/T) ** scale_pow)) / 2`` and
  ``scale(t) = 1 + (scale - 1) * s(t)``: no guidance at ``t = T`` (pure noise), full at ``t = 0``.
  ``scale_pow`` 4 is the official default; a large power guides only the last steps.
* ``linear`` -- a linear ramp ``1 + (scale - 1) * (1 - t/T)`` (the ramped scale of MaskGIT
  re-implementations, where ``t/T`` is the fraction of decoding left).

**How the conditional and unconditional outputs are combined** (``on``):

* ``eps`` -- ``uncond + s * (cond - uncond)`` on the first ``channels`` channels of an ε prediction;
  the others (remaining ε channels, learned Σ) pass through unguided. ``channels`` 3 is the official
  DiT/MDT/DiffiT behaviour (a GLIDE leftover: only 3 of 4 latent channels are guided); ``"all"`` is
  standard CFG. As the official slice ``eps[:, :3]``, 3 on a 1-channel model guides its one channel.
* ``logits`` -- ``uncond + s * (cond - uncond)`` on every logit (token methods).
* ``log_probs`` -- the same on log-probabilities, renormalised with a log-softmax over the class
  dimension and clamped at -70 (VQ-Diffusion's guidance on log p(x0)).

Scale 1 (any schedule) is no guidance: the process runs the plain conditional forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

GUIDANCE_SCHEDULES = ("constant", "power_cosine", "linear")
GUIDANCE_TARGETS = ("eps", "logits", "log_probs")
LOG_EPS = -70.0  # VQ-Diffusion's clamp of log-probabilities


def check_guidance_schedule(schedule: str, scale_pow: float) -> None:
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"cfg_schedule={schedule!r} is not a guidance schedule; use constant (DiT), power_cosine (MDT, DiffiT) "
            f"or linear."
        )
    if schedule == "power_cosine" and not float(scale_pow) > 0:
        raise ValueError(f"scale_pow={scale_pow!r} must be positive for the power-cosine schedule (official: 4).")


def power_cosine_scale(t: torch.Tensor, cfg_scale: float, scale_pow: float, num_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample guidance scale of MDT's power-cosine schedule at original timesteps ``t`` (float64 maths)."""
    frac = (1.0 - t.double() / num_timesteps).clamp(min=0.0) ** float(scale_pow)
    s = (1.0 - torch.cos(math.pi * frac)) / 2.0
    return 1.0 + (float(cfg_scale) - 1.0) * s


def linear_scale(t: torch.Tensor, cfg_scale: float, num_timesteps: int = 1000) -> torch.Tensor:
    """Per-sample scale of the linear ramp: 1 at ``t = T``, ``cfg_scale`` at ``t = 0`` (float64 maths)."""
    frac = (1.0 - t.double() / num_timesteps).clamp(min=0.0, max=1.0)
    return 1.0 + (float(cfg_scale) - 1.0) * frac


def guidance_scale(
    t: torch.Tensor, cfg_scale: float, schedule: str = "constant", scale_pow: float = 4.0, num_timesteps: int = 1000
) -> torch.Tensor | float:
    """The guidance scale for timesteps ``t`` under ``schedule`` (a float for ``constant``)."""
    check_guidance_schedule(schedule, scale_pow)
    if schedule == "constant":
        return float(cfg_scale)
    if schedule == "power_cosine":
        return power_cosine_scale(t, cfg_scale, scale_pow, num_timesteps)
    return linear_scale(t, cfg_scale, num_timesteps)


def resolve_guidance_channels(guidance_channels: int | str, in_channels: int, owner: str = "guidance") -> int:
    """How many ε channels are guided: an int (clipped to ``in_channels``, as the official slice) or ``"all"``."""
    if isinstance(guidance_channels, str):
        if guidance_channels.strip().lower() == "all":
            return in_channels
        if guidance_channels.strip().isdigit():
            guidance_channels = int(guidance_channels)
    if isinstance(guidance_channels, (int, np.integer)) and not isinstance(guidance_channels, bool):
        if int(guidance_channels) >= 1:
            return min(int(guidance_channels), in_channels)
    raise ValueError(
        f"{owner}: guidance_channels={guidance_channels!r} is not valid for in_channels={in_channels}; "
        f'use a positive integer (3 reproduces the official code) or "all" (e.g. guidance_channels=all).'
    )


def _per_sample(scale: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a per-sample tensor is cast to ``like`` and shaped to broadcast over its rows."""
    if torch.is_tensor(scale) and scale.ndim > 0:
        return scale.reshape(-1).to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def cfg_on_eps_pairs(out: torch.Tensor, in_channels: int, channels: int | str, scale) -> torch.Tensor:
    """The official DiT ``forward_with_cfg`` combination on a ``[cond; uncond]`` output (2N rows).

    On the first ``channels`` ε channels both halves become ``uncond + s * (cond - uncond)``; every other
    channel keeps each half's own value. ``scale`` is a float or a per-sample tensor of shape (N,) or (2N,)
    (the first half is used).
    """
    g = resolve_guidance_channels(channels, in_channels)
    n = out.shape[0]
    if n % 2:
        raise ValueError(
            f"classifier-free guidance needs a [cond; uncond] batch, but it has an odd size {n}; "
            "double the inputs with Guider.double() first."
        )
    half = n // 2
    if torch.is_tensor(scale) and scale.ndim > 0:
        s = scale.reshape(-1)
        if s.shape[0] == n:
            s = s[:half]
        elif s.shape[0] != half:
            raise ValueError(
                f"a per-sample cfg scale must have shape ({half},) or ({n},) for a batch of {n}, "
                f"got {tuple(scale.shape)}."
            )
        scale = s
    s = _per_sample(scale, out[:half])
    eps, rest = out[:, :g], out[:, g:]
    cond_eps, uncond_eps = eps[:half], eps[half:]
    half_eps = uncond_eps + s * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class Guider:
    """Classifier-free guidance: ``scale`` moved by ``schedule`` and applied ``on`` ε, logits or log-probs.

    Args:
        scale: the guidance scale (1: no guidance).
        schedule: ``constant`` | ``power_cosine`` | ``linear`` (see the module docstring).
        scale_pow: power-cosine exponent (official 4).
        on: ``eps`` | ``logits`` | ``log_probs``.
        channels: for ``on="eps"``, the ε channels guided (3 = official, ``"all"``).
        num_timesteps: T of the training process, the schedule's time axis.
    """

    def __init__(
        self,
        scale: float = 1.0,
        schedule: str = "constant",
        scale_pow: float = 4.0,
        on: str = "eps",
        channels: int | str = 3,
        num_timesteps: int = 1000,
    ):
        check_guidance_schedule(schedule, scale_pow)
        if on not in GUIDANCE_TARGETS:
            raise ValueError(f"guidance on={on!r} is not understood; use one of {', '.join(GUIDANCE_TARGETS)}.")
        if on == "eps":
            resolve_guidance_channels(channels, 4)  # validates now, before any work
        self.scale = float(scale)
        self.schedule = schedule
        self.scale_pow = float(scale_pow)
        self.on = on
        self.channels = channels
        self.num_timesteps = int(num_timesteps)

    @property
    def enabled(self) -> bool:
        return self.scale != 1.0

    def __repr__(self) -> str:
        extra = f", scale_pow={self.scale_pow:g}" if self.schedule == "power_cosine" else ""
        return f"Guider(scale={self.scale:g}, schedule={self.schedule}{extra}, on={self.on}, channels={self.channels})"

    def scale_at(self, t: torch.Tensor) -> float | torch.Tensor:
        """The scale at original timesteps ``t``: a float (constant) or a float64 tensor per sample."""
        return guidance_scale(t, self.scale, self.schedule, self.scale_pow, self.num_timesteps)

    # -- the two halves -----------------------------------------------------------------------
    @staticmethod
    def null_cond(net, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of ``cond``: every label replaced by the net's null class."""
        null = getattr(net, "null_class", None)
        if null is None:
            raise ValueError(
                "classifier-free guidance needs a net trained with label dropout (a null class); "
                "sample with cfg_scale=1 or train with label dropout (model.class_dropout_prob > 0; MaskGIT: "
                "model.cfg_dropout > 0)."
            )
        return {k: torch.full_like(v, null) if k == "y" else v for k, v in cond.items()}

    def double(self, net, x: torch.Tensor, cond: dict[str, torch.Tensor]):
        """``([x; x], [cond; null])``: the batch of DiT's ``sample.py``, conditional half first."""
        null = self.null_cond(net, cond)
        return torch.cat([x, x]), {k: torch.cat([v, null[k]]) for k, v in cond.items()}

    def combine(
        self, cond_out: torch.Tensor, uncond_out: torch.Tensor, t: torch.Tensor, in_channels: int | None = None
    ) -> torch.Tensor:
        """Guided output of N rows from the N conditional and N unconditional rows.

        ``in_channels`` (ε only): the channels of the ε part of the output (the rest, e.g. learned Σ, is
        never guided); default: all of them.
        """
        s = _per_sample(self.scale_at(t), cond_out)
        if self.on == "eps":
            g = resolve_guidance_channels(self.channels, in_channels or cond_out.shape[1])
            c, u = cond_out[:, :g], uncond_out[:, :g]
            return torch.cat([u + s * (c - u), cond_out[:, g:]], dim=1)
        guided = uncond_out + s * (cond_out - uncond_out)
        if self.on == "log_probs":
            guided = (guided - torch.logsumexp(guided, dim=1, keepdim=True)).clamp(LOG_EPS, 0.0)
        return guided

    # -- forwards -----------------------------------------------------------------------------
    def paired_eps_model(self, forward: Callable) -> Callable:
        """A model for a sampling loop whose state is the doubled batch ``[x; x]`` (the official DiT loop).

        As DiT's ``forward_with_cfg``: the first half of the state feeds both halves, the output is
        combined by :func:`cfg_on_eps_pairs` (both halves guided), so the loop's noise draws, and hence
        the samples, are those of the official code for the same generator.
        """

        def model(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
            half = x[: len(x) // 2]
            out = forward(torch.cat([half, half], dim=0), t, **cond)
            return cfg_on_eps_pairs(out, x.shape[1], self.channels, self.scale_at(t))

        return model

    def guided_forward(self, forward: Callable, net, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """One guided forward of N rows: the net runs once on ``[x; x]`` with ``[cond; null]``, then combine."""
        if not self.enabled:
            return forward(x, t, **cond)
        xx, cc = self.double(net, x, cond)
        out = forward(xx, torch.cat([t, t]), **cc)
        n = len(x)
        return self.combine(out[:n], out[n:], t, in_channels=x.shape[1])
