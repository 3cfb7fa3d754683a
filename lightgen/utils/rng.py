"""Capture and restore every random number generator a training step touches."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def get_rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (all devices) without Lightning's global side effects."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator_device(generator: torch.Generator | None, device) -> torch.device:
    """Where to draw: the generator's own device (a CPU generator draws on the CPU for any device, so a seed gives
    the same numbers everywhere), else ``device``."""
    return generator.device if generator is not None else torch.device(device)


def draw(kind: str, shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """``torch.rand`` (``kind="rand"``) or ``torch.randn`` (``"randn"``) of ``shape`` from ``generator`` (or the
    global RNG) on :func:`generator_device`, moved to ``device``."""
    fn = {"rand": torch.rand, "randn": torch.randn}[kind]
    return fn(tuple(shape), generator=generator, device=generator_device(generator, device)).to(device)
