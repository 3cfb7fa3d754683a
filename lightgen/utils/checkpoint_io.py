"""Checkpoint writes that never leave a half-written file behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightgen.utils.io import atomic_write


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
