"""Images per second over the whole run (all ranks), logged every step."""

from __future__ import annotations

import time

import lightning.pytorch as pl


class Throughput(pl.Callback):
    """Logs ``train/images_per_sec``: global batch / wall time of the step, averaged over the
    steps since the last log so data loading and logging are counted."""

    def __init__(self, window: int = 20):
        self.window = window
        self._times: list[float] = []
        self._t0: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._times.append(now - self._t0)
        self._times = self._times[-self.window :]
        self._t0 = now
        per_rank = len(batch["label"]) if isinstance(batch, dict) and "label" in batch else 0
        global_batch = per_rank * trainer.world_size * trainer.accumulate_grad_batches
        mean = sum(self._times) / len(self._times)
        if per_rank and mean > 0:
            pl_module.log("train/images_per_sec", global_batch / mean, on_step=True, on_epoch=False)
