"""Test-only pieces that a training run loads through Hydra (``diffusion._target_=lightgen_test_probes....``).

Run with ``tests/`` on ``PYTHONPATH`` (see ``PROBES_ENV``); never used outside the tests.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightgen.diffusion import GaussianDiffusionProcess
from lightgen.first_stage import IdentityFirstStage
from lightgen.utils.checkpoints import AtomicCheckpointIO

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


# -- fault injection (tests/test_reliability.py) ----------------------------------------------------------------
class FullDiskCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` whose ``fail_at``-th checkpoint write (1-based) runs out of space half-way: it
    writes part of the file and raises ``OSError(ENOSPC)`` from inside the writer, as a full disk does.

    ``trainer.plugins.0._target_=lightgen_test_probes.FullDiskCheckpointIO +trainer.plugins.0.fail_at=3``.
    """

    def __init__(self, fail_at: int = 2):
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.calls += 1
        if self.calls < self.fail_at:
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def half_then_full(obj, f, *args, **kwargs):
            f.write(b"partial checkpoint bytes " * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        torch.save = half_then_full
        try:
            return super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


class NaNBatches(pl.Callback):
    """Fills the images of the batches of steps ``start`` .. ``start + count - 1`` with NaN (a corrupt record in
    the data), so their loss and gradients are not finite. ``+callbacks.nan._target_=lightgen_test_probes.NaNBatches``.
    """

    def __init__(self, start: int = 2, count: int = 1):
        self.start, self.count = start, count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start <= trainer.global_step < self.start + self.count:
            batch["image"].fill_(float("nan"))


class SlowIdentity(IdentityFirstStage):
    """The identity first stage, ``delay`` seconds per encoded batch: an extraction slow enough to kill mid-way."""

    def __init__(self, delay: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.delay = delay

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().encode(images)


class SlowDiskCheckpointIO(AtomicCheckpointIO):
    """``AtomicCheckpointIO`` on a slow disk: each checkpoint is written in two halves ``delay`` seconds apart, so
    a test can kill the process while a ``*.tmp`` file is half written. The bytes written are the same."""

    def __init__(self, delay: float = 0.3):
        super().__init__()
        self.delay = delay

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        real_save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(self.delay)
            f.write(data[len(data) // 2 :])

        torch.save = slow_save
        try:
            return super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save
