"""Train a method: ``python -m lightgen.train [experiment=...] [group=option ...] [key=value ...]``.

Everything is built from the Hydra config (conf/train.yaml). The run directory is Hydra's; it
holds config.yaml (resolved), overrides.yaml, checkpoints/ (last.ckpt + periodic), logs and
samples/. Re-running a command with the same ``hydra.run.dir`` resumes from its last.ckpt.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightgen.callbacks.nonfinite import NonFiniteTraining
from lightgen.compose import build_method, check_composition, init_from
from lightgen.utils import cli, ddp_launch, launch, signals
from lightgen.utils.checkpoints import check_checkpoint_matches, find_resume_checkpoint, load_checkpoint
from lightgen.utils.errors import LightgenConfigError, first_line, work_errors
from lightgen.utils.instantiate import instantiate_dict, quiet_known_warnings, root_cause, startup_errors
from lightgen.utils.rng import seed_all
from lightgen.utils.sweep import write_result


def build(cfg: DictConfig):
    """Build and validate everything a run needs, writing nothing. Raises on bad input."""
    check_composition(cfg)
    out = Path(cfg.paths.output_dir)
    if cfg.trainer.get("max_steps", -1) is None or int(cfg.trainer.max_steps) <= 0:
        raise LightgenConfigError("trainer.max_steps must be a positive step budget (training is step-based).")
    seed_all(int(cfg.seed))  # identical initialisation on every rank

    datamodule = instantiate(cfg.data)
    if hasattr(datamodule, "expected_first_stage"):  # latents: compare the full first-stage settings
        datamodule.expected_first_stage = OmegaConf.to_container(cfg.first_stage, resolve=True)
    if hasattr(datamodule, "check"):
        datamodule.check()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    module = build_method(cfg.method, config=resolved)  # first stage, net, process, ... as cfg.method lists them

    check_optimizer(module)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and cfg.get("init_from") is not None:
        raise LightgenConfigError(
            "ckpt_path= resumes a run and init_from= starts a new one from given weights; pass only one of them."
        )
    if ckpt_path is None and cfg.get("auto_resume", True):
        found = find_resume_checkpoint(
            out, warn=rank_zero_only(lambda m: print(f"lightgen.train: warning: {m}", file=sys.stderr))
        )
        ckpt_path = str(found) if found else None
    if ckpt_path is not None:
        net = module.net if cfg.get("model") else None
        check_checkpoint_matches(load_checkpoint(ckpt_path), net, ckpt_path, resolved.get("model"))
    elif cfg.get("init_from") is not None:  # a new run from given weights (a re-run resumes instead)
        loaded = init_from(module, cfg.init_from)
        rank_zero_only(print)(f"lightgen.train: starting at step 0 from {loaded} ({cfg.init_from})")

    callbacks = instantiate_dict(cfg.get("callbacks"))
    loggers = instantiate_dict(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return dict(datamodule=datamodule, module=module, trainer=trainer, ckpt_path=ckpt_path, config=resolved)


def check_optimizer(module) -> None:
    """One sentence for optimiser settings torch would reject only at the first step (``optim.optimizer.lr=fast``)."""
    factory = getattr(module, "optimizer_factory", None)
    if factory is None:
        return
    for key, value in getattr(factory, "keywords", {}).items():
        if isinstance(value, str):
            raise LightgenConfigError(f"optim.optimizer.{key}={value!r} must be a number, not text.")
    try:
        factory(params=[torch.nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as e:
        raise LightgenConfigError(f"optim.optimizer is not valid ({first_line(e)}); fix its settings.") from e


@rank_zero_only
def write_run_files(cfg: DictConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    except ValueError:
        overrides = []
    (out / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))


def train(cfg: DictConfig) -> dict:
    ddp_launch.install("lightgen.train")  # DDP children of a -m sweep job rerun that job, not the sweep
    launch.configure_threads()  # srun / torchrun processes: their share of the node's cores
    quiet_known_warnings()
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+/Hopper, as DiT's train.py
    with startup_errors("lightgen.train"):
        run = build(cfg)
    out = Path(cfg.paths.output_dir)
    write_run_files(cfg, out)
    trainer = run["trainer"]
    for logger in trainer.loggers:
        logger.log_hyperparams(run["config"])
    if run["ckpt_path"]:
        rank_zero_only(print)(f"lightgen.train: resuming from {run['ckpt_path']}")
    with signals.exit_on_terminated("lightgen.train", kept=lambda: _kept(out)), run_errors("lightgen.train", out):
        trainer.fit(run["module"], datamodule=run["datamodule"], ckpt_path=run["ckpt_path"], weights_only=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    metrics["global_step"] = trainer.global_step
    finished = trainer.state.status == TrainerStatus.FINISHED
    rank_zero_only(write_result)(
        out, metrics, world_size=trainer.world_size, status="ok" if finished else str(trainer.state.status.value)
    )
    _finish_wandb()
    return metrics


def _kept(out: Path) -> str:
    from lightgen.callbacks.step_checkpoint import periodic_checkpoints

    last = out / "checkpoints" / "last.ckpt"
    if not last.is_file():  # e.g. a peer lost between a periodic file and its last.ckpt link
        found = periodic_checkpoints(out / "checkpoints")
        last = found[-1][1] if found else None
    return f"{last} is kept; re-run the same command to resume" if last else "no checkpoint was written yet"


@contextlib.contextmanager
def run_errors(prog: str, out: Path):
    """A run that diverged (:class:`NonFiniteTraining`), bad input met during training and failed writes stop
    with one line (see :func:`lightgen.utils.errors.work_errors`); atomic writes keep every checkpoint."""
    with work_errors(prog, kept=lambda: _kept(out)):
        try:
            yield
        except NonFiniteTraining as e:
            print(f"{prog}: error: {e}; {_kept(out)}.", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except RuntimeError as e:
            if not collective_failure(e):
                raise
            print(
                f"{prog}: error: lost contact with another process of the run ({peer_error(e)}): a node died or "
                f"hung past trainer.strategy.timeout; {_kept(out)} (on every node)",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1) from None


def peer_error(e: BaseException) -> str:
    """gloo's / NCCL's first line without its source location and advice: ``Read error [host]:port: Connection
    reset by peer``."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e))
    return text.split(". ")[0].rstrip(".")


def collective_failure(e: BaseException) -> bool:
    """A collective (all-reduce, barrier, broadcast) failed because a peer process is gone or did not answer."""
    import traceback

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if isinstance(e, getattr(torch.distributed, "DistError", ())):
        return True
    return any(
        "torch/distributed" in frame.filename.replace("\\", "/") for frame in traceback.extract_tb(e.__traceback__)
    )


def _finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run so the next job of a multirun starts its own."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except ImportError:
        pass


class JobFailed(RuntimeError):
    """A job of a multirun stopped on bad input; Hydra records it as failed and runs the next job."""


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_multirun_job(cfg: DictConfig) -> dict:
    """One job of a ``-m`` sweep, run in the sweep's process by Hydra's launcher.

    A start-up error stops a single run with one line and exit status 2; in a sweep it must not stop the
    sweep, so it is raised as :class:`JobFailed` (an Exception: Hydra records the job as failed, runs the
    others, and the sweep summary lists it). The process is left clean for the next job (DDP children, process
    group, environment), and the W&B run is closed even after a failure.
    """
    with ddp_launch.multirun_job():
        try:
            return train(cfg)
        except BaseException as e:
            _finish_wandb(exit_code=1)
            if isinstance(e, SystemExit) and e.code not in (0, None):
                text = first_line(root_cause(e.__context__)) if e.__context__ is not None else ""
                raise JobFailed(text or f"start-up failed with exit status {e.code}") from None
            raise


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    cli.task_started()
    metrics = run_multirun_job(cfg) if _in_multirun() else train(cfg)
    return metrics.get("train/loss")


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    cli.run("lightgen.train", main, before=launch.check_run_id)
