"""Checkpoint files: writing them atomically, reading, finding the one to resume, checking them.

The callback deciding *when* to save (``StepCheckpoint``) is in ``lightgen.callbacks.step_checkpoint``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.io import atomic_write
from lightgen.utils.state_dicts import net_state_dict


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<name>.tmp`` in the same directory, fsync, then rename over the target.

    A crash or kill mid-write leaves the previous checkpoint intact; a rename is atomic on POSIX.
    Remote paths (s3://, gs://) fall back to Lightning's default writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        protocols = get_filesystem(path).protocol
        if "file" not in (protocols if isinstance(protocols, tuple) else (protocols,)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: str | Path, mmap: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LightgenConfigError(f"checkpoint {path} does not exist; check ckpt_path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, ...
        raise LightgenConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated."
        ) from e


def find_resume_checkpoint(run_dir: str | Path, warn=None) -> Path | None:
    """The checkpoint a re-run of ``run_dir`` resumes from, or None for a run that has none yet.

    First the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt``; when that file
    cannot be read (truncated by a full disk, zero bytes, not a checkpoint), the newest readable periodic
    ``checkpoints/step_*.ckpt``, with one warning line naming both files (passed to ``warn``). When checkpoint
    files exist but none can be read, one sentence (:class:`LightgenConfigError`): never a silent fresh start
    over an existing run.
    """
    from lightgen.callbacks.step_checkpoint import periodic_checkpoints  # the callback owns the file names

    run_dir = Path(run_dir)
    latest = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    latest = sorted((p for p in latest if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)
    periodic = [p for _, p in reversed(periodic_checkpoints(run_dir / "checkpoints"))]
    candidates = list(dict.fromkeys([*latest, *periodic]))  # a file once, newest first
    damaged: list[tuple[Path, str]] = []
    for path in candidates:
        problem = unreadable(path)
        if problem is None:
            if damaged and warn is not None:
                first, why = damaged[0]
                warn(f"{first} cannot be read ({why}); resuming from {path} instead")
            return path
        damaged.append((path, problem))
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise LightgenConfigError(
            f"no checkpoint in {run_dir / 'checkpoints'} can be read ({listed}); pass ckpt_path= to resume from "
            f"another file, or move the run directory away to start afresh."
        )
    return None


def unreadable(path: Path) -> str | None:
    """Why a checkpoint file cannot be resumed from (one phrase), or None when it loads as a training checkpoint."""
    try:
        if path.stat().st_size == 0:
            return "it is empty"
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        return f"{type(e).__name__}, probably truncated"
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a lightgen training checkpoint"
    return None


def _describe(model_cfg: dict | None) -> str:
    if not model_cfg:
        return "an unknown"
    keys = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "input_size", "num_classes")
    target = str(model_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    fields = ", ".join(f"{k}={model_cfg[k]}" for k in keys if k in model_cfg)
    return f"a {target}({fields})"


def check_checkpoint_matches(ckpt: dict, net: nn.Module, path: str | Path, model_cfg: dict | None = None) -> None:
    """Fail with one sentence when a checkpoint holds another architecture than ``net``."""
    if net is None:  # a method without a generator network (stage-1 autoencoders): Lightning checks keys
        return
    if "state_dict" not in ckpt:
        raise LightgenConfigError(
            f"{path} is not a lightgen training checkpoint (no 'state_dict'); official weights are imported "
            f"with lightgen.convert, and ckpt_path takes checkpoints written by lightgen.train."
        )
    theirs = {k: v.shape for k, v in net_state_dict(ckpt).items()}
    ours = {k: v.shape for k, v in net.state_dict().items()}
    if theirs != ours:
        saved_cfg = ((ckpt.get("lightgen") or {}).get("config") or {}).get("model")
        raise LightgenConfigError(
            f"checkpoint {path} holds {_describe(saved_cfg)} network but this run builds "
            f"{_describe(model_cfg)}; use the model settings it was trained with or another ckpt_path."
        )
