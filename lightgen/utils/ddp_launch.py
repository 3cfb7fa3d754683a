"""Lightning's DDP subprocess launcher inside a Hydra multirun.

With ``strategy=ddp`` on one machine, Lightning's ``_SubprocessScriptLauncher`` starts local ranks 1..N-1 by
re-running the script. Under Hydra it builds that command in
``lightning.fabric.strategies.launchers.subprocess_script._hydra_subprocess_cmd`` from ``sys.argv``: in a multirun
``sys.argv`` still holds ``-m`` and the comma lists, so every child starts a sweep of its own (Lightning #11300,
#18175; Hydra #2070). :func:`install` replaces that function (in the fabric module and in
``lightning.pytorch.strategies.launchers.subprocess_script``, which imports it by name) with one that, in MULTIRUN
mode, rebuilds the single job instead::

    python -m lightgen.train [--config-path/--config-name/--config-dir as given] <the job's task overrides>
        <the user's other hydra.* overrides> hydra.mode=RUN hydra.run.dir=<job dir> hydra.sweep.dir=<sweep dir>
        hydra.output_subdir=null hydra.job.name=train_ddp_process_<r>

(the idea of Lightning PR #11617 and rAI-toolbox's HydraDDP). In RUN mode Lightning's own command is kept.

Several DDP jobs also run one after another in the sweep's process (Hydra's BasicLauncher), and Lightning leaves
the process group and LOCAL_RANK/WORLD_SIZE/MASTER_* in that process after a fit: the next job would then believe
its processes were created externally and reuse a dead group. :func:`multirun_job` undoes that after every job and
reaps the job's child processes (killing them when the job failed, without letting Lightning's child-process
observer kill the whole sweep).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

log = logging.getLogger(__name__)

ENTRY_MODULE = "lightgen.train"
# Hydra keys the rebuilt command sets itself: a user's value for them is dropped from the child's command.
OWN_KEYS = ("hydra.mode", "hydra.run.dir", "hydra.sweep.dir", "hydra.output_subdir", "hydra.job.name")
# A single run neither sweeps nor launches: the sweeper's and launcher's settings are dropped too.
DROPPED_PREFIXES = ("hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher")
# What Lightning's launcher writes into the environment of the process that starts the children.
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")

_state: dict = {"installed": False, "entry": ENTRY_MODULE, "original": None, "children": [], "observers": []}


def hydra_quote(text: str) -> str:
    """``text`` as a quoted Hydra override value that parses back to exactly ``text``."""
    from hydra.core.override_parser.types import Quote, QuotedString

    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _key(override: str) -> str:
    """The key of an override string (``+a.b=1`` -> ``a.b``, ``hydra/launcher=x`` -> ``hydra/launcher``)."""
    key = override.split("=", 1)[0].lstrip("~+")
    return key.split("@", 1)[0]


def multirun_child_command(
    local_rank: int,
    *,
    prefix: Sequence[str],
    task_overrides: Sequence[str],
    hydra_overrides: Sequence[str],
    output_dir: str,
    sweep_dir: str | None = None,
    config_args: Sequence[str] = (),
) -> list[str]:
    """The command that runs rank ``local_rank`` of one job of a multirun as a single Hydra run.

    ``task_overrides`` are the job's overrides as Hydra stores them (``HydraConfig.get().overrides.task``), i.e.
    already in Hydra's override grammar: they are passed as separate arguments (no shell), so they parse back
    identically. Paths are quoted for Hydra.
    """
    keep_hydra = [
        o
        for o in hydra_overrides
        if _key(o) not in OWN_KEYS and not any(_key(o) == p or _key(o).startswith(p + ".") for p in DROPPED_PREFIXES)
    ]
    own = ["hydra.mode=RUN", f"hydra.run.dir={hydra_quote(str(output_dir))}"]
    if sweep_dir is not None:
        own.append(f"hydra.sweep.dir={hydra_quote(str(sweep_dir))}")
    own += ["hydra.output_subdir=null", f"hydra.job.name=train_ddp_process_{local_rank}"]
    return [*prefix, *config_args, *task_overrides, *keep_hydra, *own]


def _entry_prefix() -> tuple[list[str], bool]:
    """How to start the entry point again, and whether ``sys.argv`` is that entry point's command line."""
    import __main__

    entry = _state["entry"]
    spec = getattr(__main__, "__spec__", None)
    if spec is not None and spec.name == entry:
        return [sys.executable, "-m", entry], True
    main_file = getattr(__main__, "__file__", None)
    if spec is None and main_file and sys.argv and os.path.abspath(sys.argv[0]) == os.path.abspath(main_file):
        # a script run as a file (python path/to/script.py): Lightning's own choice
        return [sys.executable, os.path.abspath(sys.argv[0])], True
    # e.g. run by a launcher's worker (submitit): start the entry module itself
    return [sys.executable, "-m", entry], False


def _config_args(argv_is_entry: bool) -> list[str]:
    """--config-path / --config-name / --config-dir of this run, so the child composes the same primary config."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    args: list[str] = []
    if argv_is_entry:
        from hydra._internal.utils import get_args_parser

        parsed, _ = get_args_parser().parse_known_args(sys.argv[1:])
        if parsed.config_path is not None:
            args.append(f"--config-path={parsed.config_path}")
        if parsed.config_dir is not None:
            args.append(f"--config-dir={parsed.config_dir}")
    else:
        for source in hc.runtime.config_sources:
            if source.provider == "command-line" and source.schema == "file":
                args.append(f"--config-dir={source.path}")
    if hc.job.config_name:
        args.append(f"--config-name={hc.job.config_name}")
    return args


def hydra_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """Replacement for Lightning's ``_hydra_subprocess_cmd``: a single-job command in MULTIRUN mode."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from hydra.utils import get_original_cwd
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return _state["original"](local_rank)
    prefix, argv_is_entry = _entry_prefix()
    command = multirun_child_command(
        local_rank,
        prefix=prefix,
        task_overrides=OmegaConf.to_container(hc.overrides.task, resolve=False),
        hydra_overrides=OmegaConf.to_container(hc.overrides.hydra, resolve=False),
        output_dir=hc.runtime.output_dir,
        sweep_dir=str(hc.sweep.dir),
        config_args=_config_args(argv_is_entry),
    )
    return command, get_original_cwd()


def _observer_class():
    from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

    class _StoppableObserver(_ChildProcessObserver):
        """Lightning's observer (a dead child kills every process) that a finished multirun job can switch off."""

        stopped = False

        def _run(self) -> bool:
            return True if self.stopped else super()._run()

        def _terminate_all(self) -> None:
            if not self.stopped:
                super()._terminate_all()

    return _StoppableObserver


def _launch_process_observer(child_processes: list[subprocess.Popen]) -> None:
    observer = _observer_class()(child_processes=child_processes, main_pid=os.getpid())
    _state["children"].extend(child_processes)
    _state["observers"].append(observer)
    observer.start()


def install(entry: str = ENTRY_MODULE) -> bool:
    """Patch Lightning's subprocess launcher (idempotent). False when this Lightning has no such function."""
    _state["entry"] = entry
    if _state["installed"]:
        return True
    try:
        import lightning.fabric.strategies.launchers.subprocess_script as fabric_launcher
        import lightning.pytorch.strategies.launchers.subprocess_script as pl_launcher
    except ImportError:
        return False
    modules = (fabric_launcher, pl_launcher)
    if not all(hasattr(m, "_hydra_subprocess_cmd") and hasattr(m, "_launch_process_observer") for m in modules):
        log.warning("lightgen: this Lightning version has no _hydra_subprocess_cmd; DDP inside -m sweeps is unpatched")
        return False
    _state["original"] = fabric_launcher._hydra_subprocess_cmd
    for module in modules:
        module._hydra_subprocess_cmd = hydra_subprocess_cmd
        module._launch_process_observer = _launch_process_observer
    _state["installed"] = True
    return True


def _reap_children(failed: bool, timeout: float = 120.0) -> None:
    """Wait for (or, after a failure, kill) the child processes started during this job."""
    children, observers = list(_state["children"]), list(_state["observers"])
    _state["children"].clear()
    _state["observers"].clear()
    if failed:
        for observer in observers:
            observer.stopped = True
        for proc in children:
            if proc.poll() is None:
                proc.kill()
    for proc in children:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("lightgen: DDP child %d did not exit; killing it", proc.pid)
            proc.kill()
            proc.wait()
    for observer in observers:
        observer.stopped = True


@contextlib.contextmanager
def multirun_job() -> Iterator[None]:
    """Run one job of an in-process multirun so that the next job starts from a clean process.

    After the job: its DDP children are reaped (killed if the job failed), the default process group is
    destroyed, and the variables Lightning's launcher put into the environment are restored.
    """
    env_before = {k: os.environ.get(k) for k in DIST_ENV}
    failed = True
    try:
        yield
        failed = False
    finally:
        _reap_children(failed)
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception as e:  # never hide the job's own error behind a teardown error
            log.warning("lightgen: could not destroy the process group: %s", e)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
