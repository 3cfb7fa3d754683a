"""Logger construction helpers."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_configured() -> bool:
    """True when this machine can reach W&B with credentials (or the user forced online mode)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return False
    if mode == "online" or os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        return path.exists() and netrc.netrc(path).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_name_from_overrides() -> str | None:
    """A readable run name from the command-line overrides (Hydra's override_dirname)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().job.override_dirname
        return name or None
    except Exception:  # not under Hydra
        return None


def sweep_group(task_name: str | None = None) -> str | None:
    """The W&B group of a multirun job: ``<task_name>-<sweep dir name>``, the same for every job of one sweep.

    None outside a multirun (a single run has no group). Hydra resolves the sweep dir once per sweep (the
    ``${now:}`` in it is cached and copied into every job), so all its jobs agree.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        sweep = Path(str(hc.sweep.dir)).name
    except Exception:  # not under Hydra
        return None
    if not task_name or sweep.startswith(str(task_name)):
        return sweep
    return f"{task_name}-{sweep}"


def wandb_logger(offline="auto", name=None, group="auto", tags=None, task_name=None, **kwargs):
    """A WandbLogger that runs offline unless W&B is configured, named after the run's overrides.

    ``group="auto"``: the jobs of one ``-m`` sweep share a group (:func:`sweep_group`); a single run has none.
    """
    from lightning.pytorch.loggers import WandbLogger

    if offline == "auto":
        offline = not wandb_configured()
    name = name or run_name_from_overrides()
    if group == "auto":
        group = sweep_group(task_name)
    return WandbLogger(offline=bool(offline), name=name, group=group, tags=list(tags or []), **kwargs)


def csv_logger(save_dir: str, name: str = "", version: str = "", **kwargs):
    """Lightning's CSVLogger, but a resumed run appends to metrics.csv instead of deleting it."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _AppendingWriter(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    header = next(csv.reader(f), [])
                self.metrics_keys = list(header)

    class _AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return _AppendingCSVLogger(save_dir=save_dir, name=name, version=version, **kwargs)
