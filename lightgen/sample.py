"""Sample from a trained run: ``python -m lightgen.sample ckpt=<file> num_samples=N cfg_scale=S out=<dir>``.

Writes ``grid.png`` and ``samples.npz`` (``arr_0``: uint8 N x H x W x C, ``arr_1``: int64 labels,
the layout ADM's evaluator reads) with the EMA weights, and ``png/NNNNNN.png`` when ``png=true``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from rich.console import Console

from lightgen.utils.checkpoints import load_checkpoint
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.images import save_grid, to_uint8
from lightgen.utils.instantiate import startup_errors
from lightgen.utils.io import atomic_write


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
    method = instantiate(cfg.method, _partial_=True)
    module = method(
        net=instantiate(cfg.model),
        diffusion=instantiate(cfg.diffusion),
        first_stage=instantiate(cfg.first_stage),
        optimizer=None,
        seed=int(cfg.get("seed", 0)),
        config=config,
    )
    module.load_state_dict(ckpt["state_dict"], strict=True)
    return module.to(device).eval(), cfg, ckpt


def make_labels(spec, num_samples: int, num_classes: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Labels for ``num_samples`` and the grid's row length."""
    if isinstance(spec, (list, tuple, ListConfig)):
        classes = torch.tensor([int(c) for c in spec])
        if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
            raise LightgenConfigError(f"labels={list(spec)} must be class indices in [0, {num_classes}).")
        per = math.ceil(num_samples / len(classes))
        return classes.repeat_interleave(per)[:num_samples], per
    if spec == "balanced":
        per = math.ceil(num_samples / num_classes)
        return torch.arange(num_classes).repeat_interleave(per)[:num_samples], per
    if spec == "uniform":
        return torch.randint(0, num_classes, (num_samples,), generator=generator), int(math.sqrt(num_samples)) or 1
    raise LightgenConfigError(f"labels={spec!r} is not understood; use balanced, uniform or a list of classes.")


def sample(cfg: DictConfig) -> Path:
    console = Console(stderr=True)
    with startup_errors("lightgen.sample"):
        if int(cfg.num_samples) <= 0 or int(cfg.batch_size) <= 0:
            raise LightgenConfigError("num_samples and batch_size must be positive.")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        module, run_cfg, ckpt = module_from_checkpoint(cfg.ckpt, device)
        if cfg.guidance_channels is not None:
            module.ema.guidance_channels = module.net.guidance_channels = cfg.guidance_channels
        s = module.sampling
        cfg_scale = float(s["cfg_scale"] if cfg.cfg_scale is None else cfg.cfg_scale)
        steps = int(s["steps"] if cfg.sampling_steps is None else cfg.sampling_steps)
        sampler = s["sampler"] if cfg.sampler is None else cfg.sampler
        module.sampling_process(sampler, steps)  # validates sampler/steps before any work
        gen = torch.Generator().manual_seed(int(cfg.seed))
        labels, nrow = make_labels(cfg.labels, int(cfg.num_samples), module.net.num_classes, gen)
        ckpt_path = Path(cfg.ckpt)
        out = (
            Path(cfg.out)
            if cfg.out
            else ckpt_path.parent.parent
            / "samples"
            / (f"{ckpt_path.stem}_cfg{cfg_scale:g}_{sampler}{steps}_seed{int(cfg.seed)}")
        )

    torch.set_float32_matmul_precision("high")
    chunks = []
    batches = labels.split(int(cfg.batch_size))
    for i, y in enumerate(batches):
        console.log(f"batch {i + 1}/{len(batches)}: {len(y)} samples, {sampler} {steps} steps, cfg {cfg_scale:g}")
        x = module.generate(
            y.to(device),
            cfg_scale=cfg_scale,
            steps=steps,
            sampler=sampler,
            eta=float(cfg.eta),
            generator=gen,
            progress=True,
            use_ema=bool(cfg.use_ema),
        )
        chunks.append(x.cpu())
    images = torch.cat(chunks)

    out.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images).numpy()
    atomic_write(out / "samples.npz", lambda f: np.savez(f, arr_0=arr, arr_1=labels.numpy().astype(np.int64)))
    save_grid(images[: int(cfg.grid_max)], out / "grid.png", nrow=nrow)
    if cfg.png:
        (out / "png").mkdir(exist_ok=True)
        for i, a in enumerate(arr):
            Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / "png" / f"{i:06d}.png")
    info = {
        "ckpt": str(ckpt_path),
        "global_step": int(ckpt.get("global_step", -1)),
        "num_samples": len(arr),
        "cfg_scale": cfg_scale,
        "sampler": sampler,
        "steps": steps,
        "eta": float(cfg.eta),
        "seed": int(cfg.seed),
        "labels": cfg.labels if isinstance(cfg.labels, str) else list(cfg.labels),
        "use_ema": bool(cfg.use_ema),
        "guidance_channels": module.net.guidance_channels,
    }
    (out / "sample_info.json").write_text(json.dumps(info, indent=2))
    console.log(f"wrote {out / 'grid.png'} and {out / 'samples.npz'} ({arr.shape}, uint8)")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
