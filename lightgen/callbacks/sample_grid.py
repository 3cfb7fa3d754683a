"""Fixed-seed class-conditional sample grids from the EMA net: one row per class."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch

from lightgen.sampling import draw_batch
from lightgen.utils.image_grids import log_image_to_loggers, save_grid


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` steps and at the end of training, rank 0 samples
    ``samples_per_class`` images for each of the first ``max_classes`` classes with the EMA net
    and the method's sampling settings (any can be overridden here), writes
    ``<run>/samples/step_XXXXXXX.png`` and logs the grid to every logger that takes images. The grid is
    batch 0 of :func:`lightgen.sampling.draw_batch` for its labels, so ``lightgen.sample`` with
    ``labels=[0,...,K-1] num_samples=<K*per class> batch_size=<same>`` and the same seed draws the same
    images. Its generator is its own: training randomness is untouched.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        samples_per_class: int = 8,
        max_classes: int = 10,
        seed: int = 0,
        dirname: str = "samples",
        **sampling_overrides,
    ):
        self.every_n = int(every_n_steps)
        self.samples_per_class = samples_per_class
        self.max_classes = max_classes
        self.seed = seed
        self.dirname = dirname
        self.overrides = {k: v for k, v in sampling_overrides.items() if v is not None}
        self._last_step = -1
        self.last_path: Path | None = None

    def labels(self, num_classes: int, device) -> torch.Tensor:
        classes = torch.arange(min(num_classes, self.max_classes), device=device)
        return classes.repeat_interleave(self.samples_per_class)

    def make_grid(self, trainer: pl.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        labels = self.labels(pl_module.net.num_classes, "cpu")
        images = draw_batch(pl_module, labels, len(labels), self.seed, 0, **self.overrides)
        path = Path(trainer.default_root_dir) / self.dirname / f"step_{step:07d}.png"
        save_grid(images, path, nrow=self.samples_per_class)
        self.last_path = path
        log_image_to_loggers(trainer.loggers, "samples/grid", path, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n > 0 and trainer.global_step % self.every_n == 0:
            self.make_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.make_grid(trainer, pl_module)
