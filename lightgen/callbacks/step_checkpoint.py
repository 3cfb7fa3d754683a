"""Step-based checkpoints: periodic ``step_XXXXXXX.ckpt`` plus an always-current ``last.ckpt``."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl

from lightgen.utils.io import atomic_write


class StepCheckpoint(pl.Callback):
    """Save every ``every_n_train_steps`` steps and at the end of training.

    ``last.ckpt`` is refreshed every ``last_every_n_steps`` (default: ``every_n_train_steps``) and at
    the end, so a preempted or re-run job resumes from it. Writes are atomic (see
    :class:`lightgen.utils.checkpoints.AtomicCheckpointIO`): a kill mid-write never corrupts an
    existing checkpoint.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 5000,
        last_every_n_steps: int | None = None,
        keep_periodic: bool = True,
    ):
        self.dirpath = Path(dirpath)
        self.every_n = int(every_n_train_steps)
        self.last_every_n = int(last_every_n_steps or every_n_train_steps)
        self.keep_periodic = keep_periodic
        self._last_saved_step = -1

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    def _save(self, trainer: pl.Trainer, periodic: bool) -> None:
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        target = self.dirpath / f"step_{step:07d}.ckpt" if periodic and self.keep_periodic else self.last_path
        trainer.save_checkpoint(target)
        if target != self.last_path and trainer.is_global_zero:
            with open(target, "rb") as src:
                atomic_write(self.last_path, lambda f: shutil.copyfileobj(src, f))
        trainer.strategy.barrier("lightgen.StepCheckpoint")
        self._last_saved_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n > 0 and step % self.every_n == 0:
            self._save(trainer, periodic=True)
        elif self.last_every_n > 0 and step % self.last_every_n == 0:
            self._save(trainer, periodic=False)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, periodic=False)
