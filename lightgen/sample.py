"""Sample from a trained run: ``python -m lightgen.sample ckpt=<file> num_samples=N [trainer=ddp8] out=<dir>``.

A thin entry point over :mod:`lightgen.sampling` (the library the FID callback and the sample grid use
too): the run is rebuilt from the config stored in the checkpoint (:func:`lightgen.compose.method_from_checkpoint`),
the N samples are drawn in fixed seeded batches dealt round-robin to the ranks of the Lightning trainer
(``trainer=ddp8``, ``trainer=ddp_cpu``, SLURM) -- so the images depend on the seed and the batch size,
never on the number of processes --, each finished batch is written to ``<out>/.parts/`` at once (a
killed job re-run with the same settings samples only the missing batches), and rank 0 writes, atomically,
``samples.npz`` (ADM's layout: ``arr_0`` uint8 (N, H, W, C), ``arr_1`` int64 labels), ``grid.png`` (one row
per class), ``sample_info.json`` (checkpoint, step, every setting, world size) and ``png/`` with ``png=true``.

``ckpt`` may also be a released DiT / MDT / DiffiT file (``DiT-XL-2-256x256.pt``, ``mdt_xl2_v2_ckpt.pt``,
``diffit_256.safetensors``): its family's official sampling defaults apply unless overridden, ``first_stage=``
picks the decoder (default ``sd_vae_ft_ema``), and ``sample_info.json`` records the file and the defaults.

Settings left null (``sampler``, ``steps``, ``cfg_scale``, ``cfg_schedule``, ``scale_pow``, ``eta``,
``guidance_channels``, ``choice_temperature``, ``truncation``, ``posterior``, ``purity_weight``) are the run's
``method.sampling``. Labels: ``balanced`` | ``uniform`` | a list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightgen import sampling
from lightgen.compose import method_from_checkpoint
from lightgen.utils import cli, signals
from lightgen.utils.errors import LightgenConfigError, work_errors
from lightgen.utils.instantiate import quiet_known_warnings, startup_errors

SETTING_KEYS = tuple(sampling.DEFAULTS)


def settings_of(cfg: DictConfig, ckpt_path: Path, ckpt: dict, module) -> dict:
    """Everything that decides the samples (also what a resumed output directory must match)."""
    chosen = sampling.resolve_settings(module.sampling, {k: cfg.get(k) for k in SETTING_KEYS})
    module.check_sampling(chosen)
    return {
        "ckpt": str(ckpt_path.resolve()),
        "global_step": int(ckpt.get("global_step", -1)),
        "num_samples": int(cfg.num_samples),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "labels": cfg.labels if isinstance(cfg.labels, str) else [int(c) for c in cfg.labels],
        **chosen,
        "use_ema": bool(cfg.use_ema),
        **({"released": ckpt["released"]} if "released" in ckpt else {}),
    }


def default_out(ckpt_path: Path, st: dict) -> Path:
    sched = {"constant": "", "power_cosine": f"pc{st['scale_pow']:g}", "linear": "lin"}[st["cfg_schedule"]]
    name = f"{ckpt_path.stem}_n{st['num_samples']}_cfg{st['cfg_scale']:g}{sched}_{st['sampler']}{st['steps']}"
    run_dir = ckpt_path.parent if "released" in st else ckpt_path.parent.parent  # a released file has no run dir
    return run_dir / "samples" / f"{name}_seed{st['seed']}"


def chosen_first_stage() -> str | None:
    """The ``first_stage=`` option given on the command line (a group, so only its name is read here)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get("first_stage")


def say(message: str) -> None:
    print(f"lightgen.sample: {message}", file=sys.stderr, flush=True)


def _kept(out: Path) -> str:
    parts = sorted((out / sampling.PARTS).glob("batch_*.npy")) if (out / sampling.PARTS).is_dir() else []
    return f"{len(parts)} finished batch file(s) kept in {out / sampling.PARTS}; re-run the same command to go on"


def sample(cfg: DictConfig) -> Path:
    quiet_known_warnings()
    with startup_errors("lightgen.sample"):
        if int(cfg.num_samples) <= 0 or int(cfg.batch_size) <= 0:
            raise LightgenConfigError("num_samples and batch_size must be positive.")
        module, _, ckpt = method_from_checkpoint(cfg.ckpt, "cpu", first_stage=chosen_first_stage())
        ckpt_path = Path(cfg.ckpt)
        settings = settings_of(cfg, ckpt_path, ckpt, module)
        labels = sampling.make_labels(cfg.labels, settings["num_samples"], module.net.num_classes, settings["seed"])
        out = Path(cfg.out) if cfg.out else default_out(ckpt_path, settings)
        sampling.prepare_out(out, settings)
        trainer_cfg = cfg.trainer
        if cfg.get("precision"):
            trainer_cfg = OmegaConf.merge(trainer_cfg, {"precision": cfg.precision})
        from lightning.pytorch.callbacks import RichProgressBar

        trainer = instantiate(trainer_cfg, callbacks=[RichProgressBar()], logger=False, enable_model_summary=False)

    launcher = trainer.strategy.launcher
    forward = getattr(launcher, "kill", None) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None
    torch.set_float32_matmul_precision("high")
    with (
        signals.exit_on_terminated("lightgen.sample", kept=lambda: _kept(out), forward=forward),
        work_errors("lightgen.sample", kept=lambda: _kept(out)),
    ):
        draw = {k: settings[k] for k in (*SETTING_KEYS, "use_ema")}
        task = sampling.SamplingTask(
            module, labels, settings["batch_size"], settings["seed"], out / sampling.PARTS, draw
        )
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(trainer.node_rank) == 0:
            sampling.write_settings(out, settings)
            done = task.num_batches - len(task.todo(0, 1))
            say(
                f"sampling {settings['num_samples']} images in {task.num_batches} batches of {settings['batch_size']} "
                f"on {trainer.world_size} process(es)" + (f"; {done} batches already done" if done else "")
            )
        trainer.predict(task, return_predictions=False)
        if trainer.is_global_zero:
            info = {**settings, "world_size": trainer.world_size}
            shape = sampling.merge_parts(out, task, info, cfg.grid_per_class, cfg.grid_max_classes, png=bool(cfg.png))
            say(f"wrote {out / 'samples.npz'} {shape} uint8 and {out / 'grid.png'}")
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    cli.task_started()
    sample(cfg)


if __name__ == "__main__":
    cli.run("lightgen.sample", main)
