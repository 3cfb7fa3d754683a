"""Step-based checkpoints: periodic ``step_XXXXXXX.ckpt``, an always-current ``last.ckpt``, and stops on signals."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightgen.utils import signals
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.io import atomic_write

PERIODIC = re.compile(r"step_(\d+)\.ckpt")


def periodic_checkpoints(dirpath: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the periodic checkpoints in a directory, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(dirpath).glob("step_*.ckpt") if (m := PERIODIC.fullmatch(p.name))]
    return sorted(found)


class StepCheckpoint(pl.Callback):
    """Save every ``every_n_train_steps`` steps and at the end of training; stop cleanly on SIGTERM/SIGINT.

    ``last.ckpt`` is refreshed every ``last_every_n_steps`` (default: ``every_n_train_steps``) and at
    the end, so a preempted or re-run job resumes from it. Writes are atomic (see
    :class:`lightgen.utils.checkpoints.AtomicCheckpointIO`): a kill mid-write never corrupts an
    existing checkpoint. After a periodic checkpoint, ``last.ckpt`` becomes a hard link to it (a copy where
    the file system has no links), so the newest state costs no second file.

    Disk: ``keep_last=N`` keeps only the N newest periodic checkpoints, plus any whose step is a multiple
    of ``keep_every`` (pinned), plus ``last.ckpt``. Before each write the free space is compared with the
    size of the previous checkpoint (with a 10 % margin) and a short disk stops the run with one sentence,
    leaving every existing checkpoint as it was.

    Signals: inside the training loop a stop signal (SIGTERM, SIGINT; SIGUSR1 and submitit's SIGUSR2 in a SLURM job)
    is deferred (:mod:`lightgen.utils.signals`) to the end of the current step, where all ranks agree, ``last.ckpt``
    is written and :class:`~lightgen.utils.signals.Terminated` stops the run (``lightgen.train`` exits with 128 +
    signal). Outside the loop the signal stops at once. A step whose optimiser update was skipped for a non-finite
    loss (the module's ``nonfinite_streak`` > 0) writes nothing, so the last good checkpoint stays.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 5000,
        last_every_n_steps: int | None = None,
        keep_periodic: bool = True,
        keep_last: int | None = None,
        keep_every: int | None = None,
        save_on_signal: bool = True,
    ):
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LightgenConfigError(
                    f"callbacks.checkpoint.{name}={value!r} must be a positive whole number or null (keep all)."
                )
        if int(every_n_train_steps) < 0:
            raise LightgenConfigError(
                f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps} must be >= 0 (0: only last.ckpt)."
            )
        self.dirpath = Path(dirpath)
        self.every_n = int(every_n_train_steps)
        self.last_every_n = int(last_every_n_steps or every_n_train_steps)
        self.keep_periodic = keep_periodic
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.save_on_signal = save_on_signal
        self._last_saved_step = -1
        self._last_size = 0

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    # -- writing -------------------------------------------------------------------------------
    def _check_free_space(self, trainer: pl.Trainer, target: Path) -> None:
        if not trainer.is_global_zero:
            return
        need = self._last_size or (self.last_path.stat().st_size if self.last_path.is_file() else 0)
        if not need:
            return
        free = shutil.disk_usage(self.dirpath).free
        if free < 1.1 * need:
            raise OSError(
                f"not enough free space to write {target}: about {need / 2**30:.2f} GiB needed, "
                f"{free / 2**30:.2f} GiB free on {self.dirpath}; free some space or set "
                f"callbacks.checkpoint.keep_last=N"
            )

    def _save(self, trainer: pl.Trainer, periodic: bool) -> None:
        step = trainer.global_step
        if step == self._last_saved_step:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        periodic = periodic and self.keep_periodic
        target = self.dirpath / f"step_{step:07d}.ckpt" if periodic else self.last_path
        self._check_free_space(trainer, target)
        trainer.save_checkpoint(target)
        if trainer.is_global_zero:
            self._last_size = target.stat().st_size
            if target != self.last_path:
                link_or_copy(target, self.last_path)
            if periodic:
                self._prune()
        trainer.strategy.barrier("lightgen.StepCheckpoint")
        self._last_saved_step = step

    def _prune(self) -> None:
        """Delete periodic checkpoints beyond the ``keep_last`` newest, except pinned ones (``keep_every``)."""
        if self.keep_last is None:
            return
        found = periodic_checkpoints(self.dirpath)
        for step, path in found[: max(0, len(found) - self.keep_last)]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            path.unlink(missing_ok=True)

    # -- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:  # temporary files of writes that a kill interrupted
            for tmp in self.dirpath.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
        if self.save_on_signal:  # replaces Lightning's handler (it stops without saving)
            launcher = trainer.strategy.launcher
            forward = launcher.kill if launcher is not None and hasattr(launcher, "kill") else None
            signals.install(forward=forward if trainer.is_global_zero else None)
            signals.set_deferred(True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        skipping = getattr(pl_module, "nonfinite_streak", 0) > 0
        if self.save_on_signal and self._stop_requested(trainer):
            if not skipping:
                self._save(trainer, periodic=False)
            signum = signals.requested() or signal.SIGTERM
            if signum in signals.requeue_signals() and trainer.is_global_zero:
                requeue_slurm_job(trainer)
            raise signals.Terminated(signum)
        if skipping:
            return
        if self.every_n > 0 and step % self.every_n == 0:
            self._save(trainer, periodic=True)
        elif self.last_every_n > 0 and step % self.last_every_n == 0:
            self._save(trainer, periodic=False)

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a stop signal (one tiny all-reduce per step when there are several ranks)."""
        mine = signals.requested() is not None
        if trainer.world_size == 1:
            return mine
        flag = torch.tensor([1.0 if mine else 0.0], device=trainer.strategy.root_device)
        return bool(trainer.strategy.reduce(flag, reduce_op="max").item() > 0)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(pl_module, "nonfinite_streak", 0) == 0:
            self._save(trainer, periodic=False)
        if self.save_on_signal:
            signals.check()  # a signal during the last step: stop before the end-of-training FID
            signals.set_deferred(False)  # the FID / grid phases after training stop at once

    def on_exception(self, trainer, pl_module, exception) -> None:
        # A stop while another callback worked after the step (e.g. a mid-training FID): the state is between
        # steps, so one process can still write last.ckpt (several would need collectives, which is unsafe here).
        if (
            isinstance(exception, signals.Terminated)
            and self.save_on_signal
            and trainer.world_size == 1
            and getattr(pl_module, "nonfinite_streak", 0) == 0
            and trainer.global_step > max(self._last_saved_step, 0)
        ):
            self._save(trainer, periodic=False)
        signals.set_deferred(False)


def requeue_slurm_job(trainer: pl.Trainer) -> None:
    """SLURM's warning signal (``--signal=USR1@90``) with ``trainer=slurm`` (auto-requeue): after ``last.ckpt`` is
    written, put the job back in the queue, as Lightning's own handler does; the requeued job resumes from it."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    if not (isinstance(env, SLURMEnvironment) and getattr(env, "auto_requeue", False) and job):
        return
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    state = "requeued" if result.returncode == 0 else f"could not be requeued ({result.stderr.strip()})"
    print(f"lightgen.train: SLURM job {job} {state}", file=sys.stderr, flush=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically: a hard link renamed over it, else a copy."""
    tmp = dst.with_name(f"{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return
    except OSError:
        tmp.unlink(missing_ok=True)
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
