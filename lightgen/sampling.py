"""Drawing class-conditional samples: one library for ``lightgen.sample``, the FID callback and the sample grid.

* **Settings** -- :func:`resolve_settings` fills a method's sampling defaults and a caller's overrides in
  one place (``sampler``, ``steps``, ``cfg_scale``, ``cfg_schedule``, ``scale_pow``, ``eta``,
  ``guidance_channels``, ``choice_temperature``, ``truncation``, ``posterior``, ``purity_weight``); each process
  takes the ones its ``sampling_keys`` name.
* **Which samples** -- N samples are cut into fixed batches of ``batch_size``; batch ``b`` holds samples
  ``b*B .. b*B+B-1`` (labels from :func:`make_labels`) and draws all its noise from a generator seeded by
  :func:`batch_seed` ``(seed, b)``; batch ``b`` goes to rank ``b mod W``. So the images depend on the
  seed, the labels and the batch size, never on the number of processes, and every caller that asks
  for the same batch gets the same images (:func:`draw_batch`).
* **Writing** -- :class:`SamplingTask` runs the batches under ``Trainer.predict`` (any trainer config
  shards them), writing each finished batch to ``<out>/.parts/`` at once, so a killed job re-run with
  the same settings samples only what is missing; :func:`merge_parts` streams them into ADM's
  ``samples.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` int64 labels) with a grid and ``sample_info.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import ListConfig

from lightgen.diffusion.guidance import check_guidance_schedule
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.image_grids import save_grid, to_uint8
from lightgen.utils.io import atomic_write
from lightgen.utils.npz import NpzMember, write_npz_streaming

PARTS = ".parts"

DEFAULTS = {
    "sampler": "ddpm",  # ddpm (ancestral, DiT's choice) | ddim
    "steps": 250,  # respaced steps ("250" in DiT)
    "cfg_scale": 4.0,  # DiT: 4.0 for visuals, 1.5 for FID
    "cfg_schedule": "constant",  # constant (DiT) | power_cosine (MDT, DiffiT 256 px) | linear
    "scale_pow": 4.0,  # power-cosine exponent (official 4)
    "eta": 0.0,  # DDIM only
    "guidance_channels": 3,  # guided eps channels: 3 = official DiT/MDT/DiffiT, "all" = standard CFG
    "choice_temperature": 4.5,  # MaskGIT: Gumbel noise on the re-masking confidence, annealed to 0 (official 4.5)
    "truncation": 1.0,  # VQ-Diffusion: keep p(x0|x_t)'s classes within cumulative prob r (top{r}r; 1 = off)
    "posterior": "official",  # VQ-Diffusion, steps < T: official (sample_fast's approximation) | exact
    "purity_weight": 0.0,  # VQ-Diffusion sampler=purity: r of Improved VQ-Diffusion's Eq. 11 (official prior_weight 0)
}


def resolve_settings(defaults: dict, overrides: dict | None = None) -> dict:
    """``DEFAULTS`` < ``defaults`` (a method's ``sampling``) < ``overrides`` (None values keep the default)."""
    given = {**dict(defaults), **{k: v for k, v in (overrides or {}).items() if v is not None}}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise LightgenConfigError(
            f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {', '.join(DEFAULTS)}."
        )
    s = {**DEFAULTS, **given}
    for key in ("steps", "cfg_scale", "scale_pow", "eta", "choice_temperature", "truncation", "purity_weight"):
        try:
            float(s[key])
        except (TypeError, ValueError):
            raise LightgenConfigError(f"{key}={s[key]!r} must be a number.") from None
    check_guidance_schedule(s["cfg_schedule"], s["scale_pow"])
    if isinstance(s["steps"], bool) or int(s["steps"]) <= 0:
        raise LightgenConfigError(f"steps={s['steps']!r} must be a positive number of sampling steps.")
    return {
        "sampler": str(s["sampler"]),
        "steps": int(s["steps"]),
        "cfg_scale": float(s["cfg_scale"]),
        "cfg_schedule": str(s["cfg_schedule"]),
        "scale_pow": float(s["scale_pow"]),
        "eta": float(s["eta"]),
        "guidance_channels": s["guidance_channels"],
        "choice_temperature": float(s["choice_temperature"]),
        "truncation": float(s["truncation"]),
        "posterior": str(s["posterior"]),
        "purity_weight": float(s["purity_weight"]),
    }


def make_labels(spec, num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """The labels of all ``num_samples`` samples, a function of (spec, N, K, seed) only.

    ``balanced``: each class N/K times in a seeded random order (so ADM's Inception-Score splits see every
    class); ``uniform``: i.i.d. uniform (DiT's and MDT's samplers); a list: repeated class by class.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(spec, (list, tuple, ListConfig)):
        classes = torch.tensor([int(c) for c in spec], dtype=torch.long)
        if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
            raise LightgenConfigError(f"labels={list(spec)} must be class indices in [0, {num_classes}).")
        return classes.repeat_interleave(math.ceil(num_samples / len(classes)))[:num_samples]
    if spec == "balanced":
        ordered = torch.arange(num_classes).repeat(math.ceil(num_samples / num_classes))[:num_samples]
        return ordered[torch.randperm(num_samples, generator=gen)]
    if spec == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=gen)
    raise LightgenConfigError(f"labels={spec!r} is not understood; use balanced, uniform or a list of classes.")


def batch_seed(seed: int, batch: int) -> int:
    """Seed of batch ``batch``'s generator: independent streams per (seed, batch)."""
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rank_batches(num_batches: int, rank: int, world: int) -> range:
    """The batches rank ``rank`` of ``world`` draws: ``rank, rank + W, ...``."""
    return range(rank, num_batches, world)


def draw_batch(method, labels: torch.Tensor, batch_size: int, seed: int, b: int, **settings) -> torch.Tensor:
    """Images in [-1, 1] of batch ``b`` of ``labels``: the same for every caller, rank and process count.

    ``method`` is a LightningModule with ``generate(labels, generator=..., **settings)``; ``settings``
    override its sampling defaults (``use_ema``, ``progress`` pass through).
    """
    device = method.device
    y = labels[b * batch_size : (b + 1) * batch_size].to(device)
    gen = torch.Generator(device=device).manual_seed(batch_seed(seed, b))
    settings.setdefault("progress", False)
    return method.generate(y, generator=gen, **settings)


def grid_indices(labels: np.ndarray, per_class: int, max_classes: int) -> tuple[list[int], int]:
    """Indices of a class-per-row grid: the first ``per_class`` samples of each of the first classes."""
    rows = []
    for c in sorted(set(labels.tolist()))[:max_classes]:
        rows.append(np.flatnonzero(labels == c)[:per_class].tolist())
    nrow = max((len(r) for r in rows), default=1)
    return [i for r in rows for i in r], nrow


class SamplingTask(pl.LightningModule):
    """Wraps a trained method for ``Trainer.predict``: each predict step draws one fixed batch to a part file."""

    def __init__(self, method, labels: torch.Tensor, batch_size: int, seed: int, parts_dir: Path, settings: dict):
        super().__init__()
        self.method = method
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.parts_dir = Path(parts_dir)
        self.settings = settings
        self.num_batches = math.ceil(len(labels) / batch_size)

    def part_path(self, b: int) -> Path:
        return self.parts_dir / f"batch_{b:07d}.npy"

    def todo(self, rank: int, world: int) -> list[int]:
        return [b for b in rank_batches(self.num_batches, rank, world) if not self.part_path(b).is_file()]

    def on_predict_start(self) -> None:
        if self.trainer.is_global_zero:
            self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.trainer.strategy.barrier("lightgen.sample.start")

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("lightgen.sample.end")  # every part is on disk before rank 0 merges

    def predict_dataloader(self):
        todo = self.todo(self.global_rank, self.trainer.world_size)
        return torch.utils.data.DataLoader(todo, batch_size=None, shuffle=False)

    def predict_step(self, b, batch_idx):
        x = draw_batch(self.method, self.labels, self.batch_size, self.seed, int(b), **self.settings)
        arr = to_uint8(x).numpy()
        atomic_write(self.part_path(int(b)), lambda f: np.save(f, arr))
        return None


def prepare_out(out: Path, settings: dict) -> None:
    """Refuse a directory holding samples of other settings; keep parts of the same settings (resume)."""
    info, parts = out / "sample_info.json", out / PARTS / "settings.json"
    for path in (info, parts):
        if path.is_file():
            old = json.loads(path.read_text())
            old = {k: old.get(k, DEFAULTS.get(k)) for k in settings}  # a setting added later: its default
            if old != settings:
                diff = ", ".join(f"{k}: {old[k]!r} -> {v!r}" for k, v in settings.items() if old[k] != v)
                raise LightgenConfigError(
                    f"{out} already holds samples made with other settings ({diff}); choose another out=... "
                    f"or delete that directory."
                )


def write_settings(out: Path, settings: dict) -> None:
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    atomic_write(out / PARTS / "settings.json", lambda f: f.write(json.dumps(settings, indent=2).encode()))


def merge_parts(
    out: Path, task: SamplingTask, info: dict, grid_per_class: int = 10, grid_max_classes: int = 10, png=False
) -> tuple[int, ...]:
    """Assemble the parts into ``samples.npz`` (+ PNGs, grid, ``sample_info.json``), then drop the parts."""
    n, labels = len(task.labels), task.labels.numpy().astype(np.int64)
    missing = [b for b in range(task.num_batches) if not task.part_path(b).is_file()]
    if missing:
        raise RuntimeError(f"batches {missing[:5]}... were not written; re-run the same command to finish them.")
    first = np.load(task.part_path(0), mmap_mode="r")
    shape = (n, *first.shape[1:])

    def chunks():
        for b in range(task.num_batches):
            yield np.load(task.part_path(b), mmap_mode="r")

    write_npz_streaming(out / "samples.npz", {"arr_0": NpzMember(shape, np.uint8, chunks), "arr_1": labels})
    data = np.load(out / "samples.npz", mmap_mode="r")["arr_0"]
    idx, nrow = grid_indices(labels, int(grid_per_class), int(grid_max_classes))
    grid = torch.from_numpy(np.asarray(data[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    save_grid(grid, out / "grid.png", nrow=nrow)
    if png:
        from PIL import Image

        (out / "png").mkdir(exist_ok=True)
        for i in range(n):
            a = np.asarray(data[i])
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / "png" / f"{i:06d}.png")
    info = {**info, "shape": list(shape)}
    atomic_write(out / "sample_info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return shape
