"""Sample from a trained run: ``python -m lightgen.sample ckpt=<file> num_samples=N [trainer=ddp8] out=<dir>``.

The N samples are cut into fixed batches of ``batch_size``; batch ``b`` always holds samples
``b*B .. b*B+B-1`` and draws all its noise from its own generator seeded by ``(seed, b)``, and
batches are dealt round-robin to the ranks of the Lightning trainer (``trainer=ddp8``,
``trainer=ddp_cpu``, SLURM). So the images depend on the seed and the batch size, never on the
number of processes. Each finished batch is written to ``<out>/.parts/`` at once; a killed job
re-run with the same settings only samples the missing batches.

At the end rank 0 writes, atomically:

* ``samples.npz`` -- ``arr_0`` uint8 (N, H, W, C), ``arr_1`` int64 labels: the layout of ADM's
  evaluator and DiT's ``sample_ddp.py`` (streamed from the parts, never all in memory);
* ``grid.png`` -- one row per class (the first samples of each class);
* ``sample_info.json`` -- checkpoint, step, every sampling setting, world size;
* ``png/NNNNNN.png`` when ``png=true``.

Labels: ``balanced`` (each class N/K times, in a seeded random order, so ADM's Inception-Score
splits see every class), ``uniform`` (i.i.d. uniform, as DiT's and MDT's samplers), or a list of
classes (repeated class by class). Guidance: ``cfg_scale``, ``cfg_schedule=constant|power_cosine``
(MDT, DiffiT), ``scale_pow``, ``guidance_channels=3|all``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console

from lightgen.utils.checkpoints import load_checkpoint
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.image_grids import save_grid, to_uint8
from lightgen.utils.instantiate import startup_errors
from lightgen.utils.io import atomic_write
from lightgen.utils.npz import NpzMember, write_npz_streaming
from lightgen.utils.sampling import batch_seed, make_labels  # noqa: F401 (re-exported)

PARTS = ".parts"


def module_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the LightningModule of a lightgen run from its checkpoint (config + weights)."""

    ckpt = load_checkpoint(path, mmap=True)
    extra = ckpt.get("lightgen") or {}
    config = extra.get("config")
    if "state_dict" not in ckpt or not config:
        raise LightgenConfigError(
            f"{path} is not a lightgen training checkpoint (no stored run config); sample from a checkpoint "
            f"written by lightgen.train (official DiT weights load through lightgen.convert)."
        )
    cfg = OmegaConf.create(config)
    parts = dict(
        net=instantiate(cfg.model) if cfg.get("model") else None,
        diffusion=instantiate(cfg.diffusion) if cfg.get("diffusion") else None,
        masking=instantiate(cfg.masking) if cfg.get("masking") and cfg.masking.get("_target_") else None,
        first_stage=instantiate(cfg.first_stage),
        optimizer=None,
        seed=int(cfg.get("seed", 0)),
        config=config,
    )
    method = instantiate(cfg.method, _partial_=True)
    module = method(
        **{k: v for k, v in parts.items() if _accepts(method.func, k) and (v is not None or k == "optimizer")}
    )
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(device).eval(), cfg, ckpt


def _accepts(fn, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def grid_indices(labels: np.ndarray, per_class: int, max_classes: int) -> tuple[list[int], int]:
    """Indices of a class-per-row grid: the first ``per_class`` samples of each of the first classes."""
    rows = []
    for c in sorted(set(labels.tolist()))[:max_classes]:
        rows.append(np.flatnonzero(labels == c)[:per_class].tolist())
    nrow = max((len(r) for r in rows), default=1)
    return [i for r in rows for i in r], nrow


class SamplingTask(pl.LightningModule):
    """Wraps a trained method for ``Trainer.predict``: each predict step samples one fixed batch."""

    def __init__(self, method, labels: torch.Tensor, batch_size: int, seed: int, parts_dir: Path, gen_kwargs: dict):
        super().__init__()
        self.method = method
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.parts_dir = Path(parts_dir)
        self.gen_kwargs = gen_kwargs
        self.num_batches = math.ceil(len(labels) / batch_size)

    def part_path(self, b: int) -> Path:
        return self.parts_dir / f"batch_{b:07d}.npy"

    def todo(self, rank: int, world: int) -> list[int]:
        return [b for b in range(rank, self.num_batches, world) if not self.part_path(b).is_file()]

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
        b = int(b)
        y = self.labels[b * self.batch_size : (b + 1) * self.batch_size].to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(batch_seed(self.seed, b))
        x = self.method.generate(y, generator=gen, progress=False, **self.gen_kwargs)
        arr = to_uint8(x).numpy()
        atomic_write(self.part_path(b), lambda f: np.save(f, arr))
        return None


def settings_of(cfg: DictConfig, ckpt_path: Path, ckpt: dict, module) -> dict:
    s = module.sampling
    pick = lambda key, default_key: s[default_key] if cfg.get(key) is None else cfg[key]  # noqa: E731
    return {
        "ckpt": str(ckpt_path.resolve()),
        "global_step": int(ckpt.get("global_step", -1)),
        "num_samples": int(cfg.num_samples),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "labels": cfg.labels if isinstance(cfg.labels, str) else [int(c) for c in cfg.labels],
        "sampler": pick("sampler", "sampler"),
        "steps": int(pick("sampling_steps", "steps")),
        "cfg_scale": float(pick("cfg_scale", "cfg_scale")),
        "cfg_schedule": pick("cfg_schedule", "cfg_schedule"),
        "scale_pow": float(pick("scale_pow", "scale_pow")),
        "eta": float(cfg.eta),
        "guidance_channels": module.net.guidance_channels if cfg.guidance_channels is None else cfg.guidance_channels,
        "use_ema": bool(cfg.use_ema),
    }


def default_out(ckpt_path: Path, st: dict) -> Path:
    sched = "" if st["cfg_schedule"] == "constant" else f"pc{st['scale_pow']:g}"
    name = f"{ckpt_path.stem}_n{st['num_samples']}_cfg{st['cfg_scale']:g}{sched}_{st['sampler']}{st['steps']}"
    return ckpt_path.parent.parent / "samples" / f"{name}_seed{st['seed']}"


def prepare_out(out: Path, settings: dict) -> None:
    """Refuse a directory holding samples of other settings; keep parts of the same settings (resume)."""
    info, parts = out / "sample_info.json", out / PARTS / "settings.json"
    for path in (info, parts):
        if path.is_file():
            old = json.loads(path.read_text())
            old = {k: old.get(k) for k in settings}
            if old != settings:
                diff = ", ".join(f"{k}: {old[k]!r} -> {v!r}" for k, v in settings.items() if old[k] != v)
                raise LightgenConfigError(
                    f"{out} already holds samples made with other settings ({diff}); choose another out=... "
                    f"or delete that directory."
                )


def merge(out: Path, task: SamplingTask, settings: dict, cfg: DictConfig, world_size: int, console: Console) -> None:
    """Rank 0: assemble the parts into samples.npz (+ PNGs, grid, info), then drop the parts."""
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
    idx, nrow = grid_indices(labels, int(cfg.grid_per_class), int(cfg.grid_max_classes))
    grid = torch.from_numpy(np.asarray(data[idx])).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    save_grid(grid, out / "grid.png", nrow=nrow)
    if cfg.png:
        (out / "png").mkdir(exist_ok=True)
        for i in range(n):
            a = np.asarray(data[i])
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / "png" / f"{i:06d}.png")
    info = {**settings, "world_size": world_size, "shape": list(shape)}
    atomic_write(out / "sample_info.json", lambda f: f.write(json.dumps(info, indent=2).encode()))
    shutil.rmtree(out / PARTS, ignore_errors=True)
    console.log(f"wrote {out / 'samples.npz'} {shape} uint8 and {out / 'grid.png'}")


def sample(cfg: DictConfig) -> Path:
    from lightgen.train import quiet_known_warnings

    quiet_known_warnings()
    console = Console(stderr=True)
    with startup_errors("lightgen.sample"):
        if int(cfg.num_samples) <= 0 or int(cfg.batch_size) <= 0:
            raise LightgenConfigError("num_samples and batch_size must be positive.")
        module, run_cfg, ckpt = module_from_checkpoint(cfg.ckpt, "cpu")
        ckpt_path = Path(cfg.ckpt)
        settings = settings_of(cfg, ckpt_path, ckpt, module)
        module.net.guidance_channels = module.ema.guidance_channels = settings["guidance_channels"]
        module.sampling_process(settings["sampler"], settings["steps"])  # validates before any work
        from lightgen.diffusion.guidance import check_guidance_schedule

        check_guidance_schedule(settings["cfg_schedule"], settings["scale_pow"])
        labels = make_labels(cfg.labels, settings["num_samples"], module.net.num_classes, settings["seed"])
        out = Path(cfg.out) if cfg.out else default_out(ckpt_path, settings)
        prepare_out(out, settings)
        trainer_cfg = cfg.trainer
        if cfg.get("precision"):
            trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": cfg.precision})
        from lightning.pytorch.callbacks import RichProgressBar

        trainer = instantiate(trainer_cfg, callbacks=[RichProgressBar()], logger=False, enable_model_summary=False)

    torch.set_float32_matmul_precision("high")
    parts = out / PARTS
    gen_kwargs = {k: settings[k] for k in ("cfg_scale", "steps", "sampler", "eta", "cfg_schedule", "scale_pow")}
    gen_kwargs["use_ema"] = settings["use_ema"]
    task = SamplingTask(module, labels, settings["batch_size"], settings["seed"], parts, gen_kwargs)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(trainer.node_rank) == 0:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(parts / "settings.json", lambda f: f.write(json.dumps(settings, indent=2).encode()))
        done = task.num_batches - len(task.todo(0, 1))
        console.log(
            f"sampling {settings['num_samples']} images in {task.num_batches} batches of {settings['batch_size']} "
            f"on {trainer.world_size} process(es)" + (f"; {done} batches already done" if done else "")
        )
    trainer.predict(task, return_predictions=False)
    if trainer.is_global_zero:
        merge(out, task, settings, cfg, trainer.world_size, console)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
