"""Timestep respacing: run a Gaussian process on a subset of the steps of a base process (ADM / DiT)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lightgen.diffusion.gaussian import GaussianDiffusion


def _parse_section_counts(num_timesteps: int, section_counts) -> list[int] | set[int]:
    """Section counts as a list of ints, or directly the kept set for "ddimN"."""
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            digits = spec[len("ddim") :]
            if not digits.isdigit() or int(digits) < 1:
                raise ValueError(
                    f"Invalid timestep respacing {section_counts!r}: 'ddimN' needs a positive integer N, e.g. 'ddim50'."
                )
            wanted = int(digits)
            for stride in range(1, num_timesteps + 1):
                kept = range(0, num_timesteps, stride)
                if len(kept) == wanted:
                    return set(kept)
            raise ValueError(
                f"Invalid timestep respacing {section_counts!r}: no integer stride takes exactly {wanted} "
                f"of {num_timesteps} steps."
            )
        parts = [p.strip() for p in spec.split(",")]
        if not spec or not all(p.isdigit() for p in parts):
            raise ValueError(
                f"Invalid timestep respacing {section_counts!r}: expected a step count like '250', "
                "comma-separated counts per section like '10,15,20', or 'ddimN'."
            )
        return [int(p) for p in parts]
    if isinstance(section_counts, (int, np.integer)) and not isinstance(section_counts, bool):
        return [int(section_counts)]
    if isinstance(section_counts, Iterable):
        counts = list(section_counts)
        if counts and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in counts):
            return [int(c) for c in counts]
    raise ValueError(
        f"Invalid timestep respacing {section_counts!r}: expected a string like '250', '10,15,20' or "
        "'ddim50', or a list of step counts."
    )


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """Steps of a ``num_timesteps`` process to keep.

    ``section_counts`` splits the process into equal sections (the first ``T % n`` get one extra
    step) and takes the given number of evenly spaced steps from each, first and last included,
    rounding fractional positions: "250" of 1000 gives {0, 4, 8, ..., 991, 995, 999}. "ddimN" uses
    the smallest integer stride s with exactly N steps in range(0, T, s) (DDIM paper striding).
    """
    parsed = _parse_section_counts(num_timesteps, section_counts)
    if isinstance(parsed, set):
        return parsed

    sections = len(parsed)
    base_size, extra = divmod(num_timesteps, sections)
    kept: list[int] = []
    start = 0
    for index, count in enumerate(parsed):
        size = base_size + (1 if index < extra else 0)
        if count < 1 or count > size:
            raise ValueError(
                f"Invalid timestep respacing {section_counts!r}: a section of {size} steps cannot hold "
                f"{count} steps (each count must be between 1 and the section size)."
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` restricted to the steps ``use_timesteps`` of a base process.

    The betas are re-derived so that ᾱ at every kept step equals the base process's ᾱ there.
    Indices 0..len(use_timesteps)-1 of this process map to original steps through ``timestep_map``;
    the network always receives the ORIGINAL steps (0..T-1), as in DiT.

    :param use_timesteps: the original steps to keep.
    :param kwargs: the :class:`GaussianDiffusion` arguments of the base process (``betas`` etc.).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        base = GaussianDiffusion(**kwargs)
        self.original_num_steps = base.num_timesteps
        kept = sorted({int(i) for i in use_timesteps})
        if not kept or kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}, got "
                f"{len(kept)} steps from {kept[0] if kept else None} to {kept[-1] if kept else None}."
            )
        self.use_timesteps = set(kept)
        self.timestep_map = kept
        abar = base.alphas_cumprod[kept]
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        kwargs["betas"] = 1.0 - abar / abar_prev
        super().__init__(**kwargs)
        self._map_tables: dict = {}

    def __getstate__(self):
        state = super().__getstate__()
        state["_map_tables"] = {}
        return state

    def map_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original steps (0..T_base-1) of this process's step indices ``t``."""
        table = self._map_tables.get(t.device)
        if table is None:
            table = torch.tensor(self.timestep_map, device=t.device, dtype=torch.long)
            self._map_tables[t.device] = table
        return table[t.long()].to(t.dtype)

    def _call_model(self, model, x, t, model_kwargs):
        return model(x, self.map_timesteps(t), **(model_kwargs or {}))
