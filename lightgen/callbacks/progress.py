"""A Rich progress bar counted in optimiser steps (training here is step-based, not epochs)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class RichProgress(RichProgressBar):
    @property
    def total_train_batches(self):
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return "train (steps)"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
