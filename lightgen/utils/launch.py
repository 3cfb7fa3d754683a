"""What a run takes from the launcher that started it (SLURM, torchrun, Lightning): its run id and its threads.

- :func:`run_id` (the ``${lightgen.run_id:}`` resolver behind ``paths.run_id``): every process of a run, on every
  node, and every re-run of the same job must land in one run directory, so that a requeued or restarted job
  resumes from its ``last.ckpt``. The id is the first of: ``$LIGHTGEN_RUN_ID``; SLURM's job id
  (``$SLURM_ARRAY_JOB_ID_$SLURM_ARRAY_TASK_ID`` for an array task, else ``$SLURM_JOB_ID``; kept across
  ``scontrol requeue``); torchrun's ``--rdzv-id`` (``$TORCHELASTIC_RUN_ID``, shared by every node and by
  torchrun's own restarts; :func:`check_run_id` refuses a multi-process torchrun run without one); else a
  timestamp, which only a single process can use (Lightning's DDP processes inherit their parent's directory).
  ``paths.run_id=<name>`` on the command line overrides all of them.
- :func:`configure_threads`: processes started by srun or torchrun each see every core of their node; unless
  ``OMP_NUM_THREADS`` is set, each uses ``$SLURM_CPUS_PER_TASK`` threads, or its node's cores divided by the
  processes on that node.
"""

from __future__ import annotations

import datetime
import os

from lightgen.utils.errors import LightgenConfigError

_timestamp: str | None = None


def run_id() -> str:
    if os.environ.get("LIGHTGEN_RUN_ID"):
        return os.environ["LIGHTGEN_RUN_ID"]
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    torchrun_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if torchrun_id and torchrun_id != "none":
        return torchrun_id
    global _timestamp
    if _timestamp is None:
        _timestamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return _timestamp


def check_run_id(overrides: list[str]) -> None:
    """Several torchrun processes without a shared id would each make their own run directory: refuse that."""
    if os.environ.get("TORCHELASTIC_RUN_ID") != "none" or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if os.environ.get("LIGHTGEN_RUN_ID") or any(o.startswith(("paths.run_id=", "hydra.run.dir=")) for o in overrides):
        return
    raise LightgenConfigError(
        "every process of a torchrun run needs the same run directory, and torchrun was given no --rdzv-id: "
        "pass torchrun --rdzv-id=<name> (the same on every node, and again to resume) or paths.run_id=<name>"
    )


def local_processes() -> int:
    """How many processes of this job run on this node, as the launcher says (1 when nothing says)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.split("(")[0].isdigit():  # SLURM_NTASKS_PER_NODE may read "4(x2)"
            return max(1, int(value.split("(")[0]))
    return 1


def configure_threads() -> int | None:
    """Threads for this process when a launcher started it and ``OMP_NUM_THREADS`` is unset; returns what was set."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit() and "SLURM_PROCID" in os.environ:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    elif "LOCAL_WORLD_SIZE" in os.environ or "SLURM_PROCID" in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = cores // local_processes()
    else:
        return None
    threads = max(1, threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # Lightning's own per-process default then leaves it alone
    torch.set_num_threads(threads)
    return threads


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("lightgen.run_id"):
        OmegaConf.register_new_resolver("lightgen.run_id", run_id, use_cache=True)
