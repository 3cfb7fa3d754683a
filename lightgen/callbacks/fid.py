"""FID during training: sample K images with the EMA net across all ranks, compare with cached reference stats."""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightgen.sampling import draw_batch, make_labels, rank_batches
from lightgen.utils import signals
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.image_grids import log_image_to_loggers, save_grid, to_uint8
from lightgen.utils.progress import PhaseProgress


def metric_name(num_samples: int) -> str:
    """``val/fid1k`` for 1,000 samples, ``val/fid50k`` for 50,000, else ``val/fid<N>``."""
    return f"val/fid{num_samples // 1000}k" if num_samples % 1000 == 0 else f"val/fid{num_samples}"


def trainer_bar(trainer: pl.Trainer):
    """The Trainer's Rich progress display while it is on screen (a phase joins it as a task), else None."""
    return getattr(getattr(trainer, "progress_bar_callback", None), "progress", None)


class FIDCallback(pl.Callback):
    """Every ``every_n_steps`` steps and/or at the end of training (``at_end``), FID-K of the EMA net.

    Each rank samples its share of ``num_samples`` class-balanced images (fixed batches seeded by
    ``(seed, batch)``, as ``lightgen.sample``: the images do not depend on the number of ranks),
    decodes them with the first stage, quantises to uint8 like the final evaluation, and accumulates
    Inception pool3 statistics; the sums are all-reduced and rank 0 computes the Fréchet distance
    against the reference statistics, logs ``val/fid<K>`` to every logger and a grid of samples.

    ``ref``: ``data`` (statistics of ``ref_num`` images of the training DataModule, computed once and
    cached in ``cache_dir``) or a reference ``.npz`` (ADM's ``VIRTUAL_imagenet256_labeled.npz`` or a
    ``lightgen.evaluate make_ref`` file). The Inception network lives here only -- never in the
    LightningModule, its checkpoints or its EMA copy -- and is loaded on first use; its weights are
    resolved (and a missing file reported) when the callback is built, before training starts.
    Sampling settings default to the method's (``method.sampling``); any can be overridden here.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        at_end: bool = False,
        num_samples: int = 1000,
        batch_size: int = 100,
        ref: str = "data",
        ref_num: int | None = 10000,
        cache_dir: str = "data/fid_refs",
        inception_weights: str | None = None,
        allow_download: bool = False,
        inception_batch_size: int = 64,
        seed: int = 0,
        grid_samples: int = 100,
        ref_data=None,
        **sampling_overrides,
    ):
        self.every_n = int(every_n_steps)
        self.at_end = bool(at_end)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.ref = str(ref)
        self.ref_num = None if ref_num is None else int(ref_num)
        self.cache_dir = Path(cache_dir)
        self.inception_batch_size = int(inception_batch_size)
        self.seed = int(seed)
        self.grid_samples = int(grid_samples)
        self.ref_data = ref_data
        self.overrides = {k: v for k, v in sampling_overrides.items() if v is not None}
        self.name = metric_name(self.num_samples)
        self.history: list[tuple[int, float]] = []
        self._last_step = -1
        self._extractor = None
        self._ref_stats = None
        self.weights = inception_weights
        self.allow_download = allow_download
        if not self.enabled:
            return
        if self.num_samples < 2 or self.batch_size < 1:
            raise LightgenConfigError(
                f"callbacks.fid: num_samples={num_samples} must be at least 2 and batch_size={batch_size} positive."
            )
        if self.ref != "data" and not Path(self.ref).is_file():
            raise LightgenConfigError(
                f"callbacks.fid.ref={self.ref} does not exist; use ref=data (statistics of the training data, cached) "
                f"or a reference .npz (ADM's VIRTUAL_imagenet256_labeled.npz or `lightgen.evaluate make_ref`)."
            )
        from lightgen.metrics.weights import resolve_weights

        self.resolved = resolve_weights(inception_weights, allow_download=allow_download)  # fails now, not later

    @property
    def enabled(self) -> bool:
        return self.every_n > 0 or self.at_end

    # -- pieces ---------------------------------------------------------------------------------
    def extractor(self, device):
        if self._extractor is None:
            from lightgen.metrics import InceptionFeatures

            self._extractor = InceptionFeatures(self.weights, device=device, allow_download=self.allow_download)
        return self._extractor.to(device)

    def reference(self, trainer: pl.Trainer, device):
        """Reference statistics (rank 0 only): the given .npz, or the training data's, cached on disk."""
        if self._ref_stats is not None:
            return self._ref_stats
        from lightgen.metrics import compute_reference, load_reference

        if self.ref != "data":
            self._ref_stats = load_reference(self.ref, extractor=self.extractor(device), progress=False).pool
            return self._ref_stats
        from lightgen.data.reference_images import count_dataset, iter_dataset_images, reference_name

        dm = self.ref_data if self.ref_data is not None else trainer.datamodule
        if dm is None or not hasattr(dm, "setup") or getattr(dm, "KIND", None) in ("latents", "tokens"):
            raise LightgenConfigError(
                "callbacks.fid.ref=data needs a DataModule with images, but the training data holds extracted "
                "latents or tokens; set callbacks.fid.ref_data to the image data (e.g. the experiment's "
                "`/data@callbacks.fid.ref_data: fashion_mnist` default) or pass a reference .npz."
            )
        num = self.ref_num
        if num is not None:
            num = min(num, count_dataset(dm))
        path = self.cache_dir / f"{reference_name(dm, num, self.seed)}.npz"
        if path.is_file():
            self._ref_stats = load_reference(path).pool
        else:
            t0 = time.perf_counter()
            batches = iter_dataset_images(dm, num, seed=self.seed, batch_size=self.inception_batch_size)
            total = num if num is not None else count_dataset(dm)
            ref = compute_reference(
                batches,
                self.extractor(device),
                self.inception_batch_size,
                total=total,
                description=f"FID reference ({total} images)",
                live=trainer_bar(trainer),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            from lightgen.metrics import save_reference

            save_reference(path, ref)
            print(f"lightgen FID: reference statistics of {total} images in {time.perf_counter() - t0:.0f} s -> {path}")
            self._ref_stats = ref.pool
        return self._ref_stats

    # -- the measurement --------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, trainer: pl.Trainer, pl_module) -> float | None:
        """FID-K now (a collective: every rank calls it); the value on rank 0, None elsewhere."""
        from lightgen.metrics import FeatureStatsAccumulator

        t0 = time.perf_counter()
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        labels = make_labels("balanced", self.num_samples, pl_module.net.num_classes, self.seed)
        num_batches = math.ceil(self.num_samples / self.batch_size)
        extractor = self.extractor(device)
        acc = FeatureStatsAccumulator(2048, device=device if device.type == "cuda" else "cpu")
        grid: list[torch.Tensor] = []
        batches = list(rank_batches(num_batches, rank, world))
        mine = sum(min(self.batch_size, self.num_samples - b * self.batch_size) for b in batches)
        what = f"{self.name}: sampling + Inception" + (f" (rank 0's {mine} of {self.num_samples})" if world > 1 else "")
        with PhaseProgress(what, mine, enabled=rank == 0, live=trainer_bar(trainer)) as bar:
            for b in batches:
                if world == 1:  # a stop signal during a mid-training FID (deferred) stops here, not after it
                    signals.check()
                x = draw_batch(pl_module, labels, self.batch_size, self.seed, b, **self.overrides)
                images = to_uint8(x)  # (N, H, W, C) uint8, as the final evaluation
                for i in range(0, len(images), self.inception_batch_size):
                    acc.update(extractor.features(images[i : i + self.inception_batch_size])["pool"])
                if rank == 0 and sum(len(g) for g in grid) < self.grid_samples:
                    grid.append(x[: self.grid_samples].float().cpu())
                bar.advance(len(images))
        acc.all_reduce()
        if rank != 0:
            return None
        ref = self.reference(trainer, device)
        fid = acc.compute().frechet_distance(ref, method="eigh")  # = sqrtm to ~1e-13, 30x faster on CPU
        step = trainer.global_step
        self.history.append((step, fid))
        pl_module.print(
            f"lightgen FID: {self.name} = {fid:.3f} at step {step} ({self.num_samples} samples, "
            f"{time.perf_counter() - t0:.0f} s)"
        )
        if grid:
            images = torch.cat(grid)[: self.grid_samples]
            path = Path(trainer.default_root_dir) / "samples" / f"fid_step_{step:07d}.png"
            save_grid(images, path, nrow=int(math.sqrt(len(images))) or 1)
            log_image_to_loggers(trainer.loggers, "samples/fid_grid", path, step)
        return fid

    def _run(self, trainer: pl.Trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        fid = self.compute(trainer, pl_module)
        if fid is not None:
            for logger in trainer.loggers:
                logger.log_metrics({self.name: fid}, step=step)
                logger.save()
        value = torch.tensor(float("nan") if fid is None else fid)
        trainer.callback_metrics[self.name] = value

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n > 0 and trainer.global_step % self.every_n == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self._run(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]
