"""Test-only pieces that a training run loads through Hydra (``diffusion._target_=lightgen_test_probes....``).

Run with ``tests/`` on ``PYTHONPATH`` (see ``PROBES_ENV``); never used outside the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from lightgen.diffusion import GaussianDiffusionProcess

TESTS = Path(__file__).resolve().parent
PROBES_ENV = {"PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}


def _sample_generator(x: torch.Tensor, step: int) -> torch.Generator:
    digest = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes() + step.to_bytes(8, "little")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def per_sample_noise_process(loss_log: str | None = None, **kwargs):
    """``GaussianDiffusionProcess(**kwargs)`` whose ADM ``training_losses`` draws each sample's timestep and noise
    from a generator seeded by (the sample's pixels, the call count), instead of the rank's RNG stream.

    lightgen draws training noise per rank (rank ``r`` of ``W`` from ``seed * W + r``), so a 1- and a
    2-process run see different noise by design. With this process the loss of every sample is a
    function of (weights, sample, step) only, whatever the number of processes, so 1 and 2 processes
    with the same global batch must follow the same trajectory up to the order of floating-point sums.

    ``loss_log``: a folder; every call appends ``{"step", "loss"}`` (the mean loss of this rank's batch)
    to ``rank<r>.jsonl`` there, so a test can compare what was logged with the per-rank values.
    """
    process = GaussianDiffusionProcess(**kwargs)
    diffusion = process.diffusion
    inner = diffusion.training_losses
    calls = [0]

    def training_losses(model, x_start, t, model_kwargs=None, noise=None):
        step = calls[0]
        calls[0] += 1
        gens = [_sample_generator(x, step) for x in x_start]
        t = torch.cat([torch.randint(0, diffusion.num_timesteps, (1,), generator=g) for g in gens]).to(x_start.device)
        noise = torch.stack([torch.randn(x_start.shape[1:], generator=g) for g in gens]).to(x_start)
        terms = inner(model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        if loss_log:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            Path(loss_log).mkdir(parents=True, exist_ok=True)
            with open(Path(loss_log) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": terms["loss"].mean().item()}) + "\n")
        return terms

    diffusion.training_losses = training_losses
    return process
