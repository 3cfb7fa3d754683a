"""Per-job results and the summary of a Hydra multirun.

Every job of a sweep leaves ``result.json`` in its run directory: ``lightgen.train`` writes it when training ends
(:func:`write_result`), and the :class:`SweepSummary` Hydra callback writes it for a job that failed or that did not
write one. At the end of the sweep (and after every job run in the sweep's own process, so a sweep that dies keeps a
summary of what finished) the callback reads them all and writes ``summary.csv`` and ``summary.md`` into the sweep
directory: one row per job with the overrides that vary across the sweep, the final ``train/loss``, every metric
whose name contains "fid", the global step, ok/failed and the run directory.

Registered in conf/hydra/default.yaml (``hydra.callbacks.sweep_summary``). Imports nothing heavy: Hydra
instantiates it in the sweep's process before any job.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightgen.utils.io import atomic_write

log = logging.getLogger(__name__)

RESULT = "result.json"
LOSS = "train/loss"
SKIP_DIRS = {".submitit", ".hydra", "checkpoints", "samples", "wandb", "tensorboard"}


def _is_global_zero() -> bool:
    """Rank 0 of this job as far as the environment says (SLURM tasks, torchrun, Lightning's children)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") not in ("0", ""):
            return False
    return True


def _dump(path: Path, record: dict) -> None:
    data = (json.dumps(record, indent=2, sort_keys=False, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def hydra_job_info() -> dict:
    """The job's number, id and task overrides when running under Hydra, else empty."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except ValueError:
        return {}
    job = hc.job
    return {
        "job_num": job.get("num"),
        "job_id": job.get("id"),
        "mode": str(getattr(hc.mode, "name", hc.mode)),
        "overrides": OmegaConf.to_container(hc.overrides.task, resolve=False),
        "override_dirname": job.get("override_dirname"),
    }


def write_result(run_dir: str | Path, metrics: dict[str, Any], **extra: Any) -> Path:
    """Write ``<run_dir>/result.json`` atomically (callers make sure only rank 0 calls it)."""
    run_dir = Path(run_dir)
    record = {
        "status": "ok",
        **hydra_job_info(),
        "metrics": {k: v for k, v in metrics.items() if k != "global_step"},
        "global_step": metrics.get("global_step"),
        **extra,
        "run_dir": str(run_dir.absolute()),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    _dump(run_dir / RESULT, record)
    return run_dir / RESULT


# ---------------------------------------------------------------------------------------------------- reading
def _read_overrides_yaml(run_dir: Path) -> list[str]:
    for p in (run_dir / "overrides.yaml", run_dir / ".hydra" / "overrides.yaml"):
        if p.is_file():
            try:
                import yaml

                data = yaml.safe_load(p.read_text())
                if isinstance(data, list):
                    return [str(x) for x in data]
            except Exception:
                pass
    return []


def _job_dirs(sweep_dir: Path) -> list[Path]:
    """Run directories of a sweep: those holding a result.json, and numbered subdirectories (Hydra's default)."""
    if not sweep_dir.is_dir():
        return []
    found = {p.parent for p in sweep_dir.rglob(RESULT) if not (set(p.relative_to(sweep_dir).parts[:-1]) & SKIP_DIRS)}
    found |= {p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()}
    return sorted(found)


def read_results(sweep_dir: str | Path) -> list[dict]:
    """One record per job directory of ``sweep_dir``, sorted by job number; unreadable or missing -> failed."""
    sweep_dir = Path(sweep_dir)
    records = []
    for run_dir in _job_dirs(sweep_dir):
        try:
            record = json.loads((run_dir / RESULT).read_text())
        except FileNotFoundError:
            record = {"status": "failed", "error": "no result.json: the job was killed or has not finished"}
        except (OSError, ValueError) as e:
            record = {"status": "failed", "error": f"unreadable result.json: {e}"}
        record.setdefault("overrides", _read_overrides_yaml(run_dir))
        if record.get("job_num") is None and run_dir.name.isdigit():
            record["job_num"] = int(run_dir.name)
        record["run_dir"] = str(run_dir.absolute())
        records.append(record)
    return sorted(records, key=lambda r: (r.get("job_num") is None, r.get("job_num") or 0, r["run_dir"]))


# ---------------------------------------------------------------------------------------------------- summary
def split_override(override: str) -> tuple[str, str | None]:
    """``key=value`` -> (key, value), keeping the ``+``/``++``/``~`` prefix; ``~key`` -> (``~key``, None)."""
    key, eq, value = override.partition("=")
    return key, (value if eq else None)


def varying_and_fixed(records: list[dict]) -> tuple[list[str], dict[str, str | None]]:
    """The override keys whose value differs between jobs (in order of appearance), and the others' values."""
    per_job = [dict(split_override(o) for o in r.get("overrides") or []) for r in records]
    keys: list[str] = []
    for d in per_job:
        keys += [k for k in d if k not in keys]
    missing = object()
    varying = [k for k in keys if len({d.get(k, missing) for d in per_job}) > 1]
    fixed = {k: per_job[0][k] for k in keys if k not in varying}
    return varying, fixed


def metric_columns(records: list[dict]) -> list[str]:
    """``train/loss`` first, then every logged metric whose name contains "fid" (val/fid1k, fid50k, ...)."""
    names = sorted({k for r in records for k in (r.get("metrics") or {}) if "fid" in k.lower()})
    return [LOSS, *names]


def summary_rows(records: list[dict]) -> tuple[list[str], list[dict], dict[str, str]]:
    varying, fixed = varying_and_fixed(records)
    metrics = metric_columns(records)
    columns = ["job", *varying, *metrics, "global_step", "status", "run_dir", "error"]
    rows = []
    for r in records:
        overrides = dict(split_override(o) for o in r.get("overrides") or [])
        row = {"job": r.get("job_num")}
        for k in varying:  # a key-only override (~key) that some jobs have: "yes"
            row[k] = (overrides[k] if overrides[k] is not None else "yes") if k in overrides else None
        row.update({m: (r.get("metrics") or {}).get(m) for m in metrics})
        row.update(global_step=r.get("global_step"), status=r.get("status", "failed"), run_dir=r["run_dir"])
        row["error"] = r.get("error")
        rows.append(row)
    return columns, rows, fixed


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def render_markdown(sweep_dir: Path, columns: list[str], rows: list[dict], fixed: dict[str, str]) -> str:
    n_ok = sum(r["status"] == "ok" for r in rows)
    lines = [f"# Sweep summary: {sweep_dir}", "", f"{len(rows)} jobs: {n_ok} ok, {len(rows) - n_ok} failed.", ""]
    if fixed:
        lines += ["Fixed overrides:", ""] + [f"- `{k}`" if v is None else f"- `{k}={v}`" for k, v in fixed.items()]
        lines.append("")
    md_columns = [c for c in columns if c != "error"]
    lines.append("| " + " | ".join(_md_cell(c) for c in md_columns) + " |")
    lines.append("|" + "|".join("---:" if c in ("job", "global_step") else "---" for c in md_columns) + "|")
    for row in rows:
        cells = []
        for c in md_columns:
            value = row[c]
            if c == "run_dir":
                value = os.path.relpath(value, sweep_dir)
            cells.append(_md_cell(_fmt(value)))
        lines.append("| " + " | ".join(cells) + " |")
    errors = [(row["job"], row["error"]) for row in rows if row["status"] != "ok" and row.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- job {j}: {_md_cell(str(e).strip().splitlines()[-1])}" for j, e in errors]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Read every job's result under ``sweep_dir`` and write summary.csv and summary.md there."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    records = read_results(sweep_dir)
    columns, rows, fixed = summary_rows(records)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    csv_bytes = buf.getvalue().encode()
    md_bytes = render_markdown(sweep_dir, columns, rows, fixed).encode()
    atomic_write(csv_path, lambda f: f.write(csv_bytes))
    atomic_write(md_path, lambda f: f.write(md_bytes))
    return csv_path, md_path


# ---------------------------------------------------------------------------------------------------- callback
def _here() -> tuple[str, int]:
    return socket.gethostname(), os.getpid()


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    return config.hydra.mode == RunMode.MULTIRUN


class SweepSummary(Callback):
    """Hydra callback: per-job result.json for every job, summary.csv / summary.md for the sweep.

    * ``on_job_start`` (MULTIRUN, rank 0): removes a stale result.json from an earlier run of the same directory.
    * ``on_job_end`` (MULTIRUN, rank 0): records a failed job (its error) or a job that wrote no result; in the
      sweep's own process (Hydra's basic launcher) it also rewrites the summary.
    * ``on_multirun_end`` writes the final summary. Hydra skips it when a job failed (the basic sweeper re-raises
      the first job error after the batch), so an ``atexit`` hook writes it then.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sweep_dir: Path | None = None
        self._where: tuple[str, int] | None = None  # (host, pid) of the sweep's own process
        self._done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        self.sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        self._where = _here()
        self._done = False
        atexit.register(self._at_exit)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled and _is_multirun(config) and _is_global_zero():
            (Path(config.hydra.runtime.output_dir) / RESULT).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if not (self.enabled and _is_multirun(config) and _is_global_zero()):
            return
        from hydra.core.utils import JobStatus

        run_dir = Path(config.hydra.runtime.output_dir)
        path = run_dir / RESULT
        failed = job_return.status == JobStatus.FAILED
        try:
            if failed or not path.is_file():
                record: dict[str, Any] = {}
                if path.is_file():
                    try:
                        record = json.loads(path.read_text())
                    except ValueError:
                        record = {}
                record.update(
                    status="failed" if failed else "ok",
                    job_num=config.hydra.job.get("num"),
                    job_id=config.hydra.job.get("id"),
                    overrides=OmegaConf.to_container(config.hydra.overrides.task, resolve=False),
                    run_dir=str(run_dir.absolute()),
                )
                record.setdefault("metrics", {})
                if failed:
                    exc = job_return._return_value
                    record["error"] = f"{type(exc).__name__}: {exc}"
                    record["traceback"] = "".join(traceback.format_exception(exc))
                    log.error("job %s failed: %s", config.hydra.job.get("num"), record["error"])
                elif isinstance(job_return._return_value, (int, float)):
                    record["return_value"] = job_return._return_value
                _dump(path, record)
        except Exception as e:  # a summary problem must never turn a good job into a failed one
            log.warning("sweep summary: could not record job %s: %s", config.hydra.job.get("num"), e)
        if self._where == _here():  # the basic launcher: jobs run in the sweep's process
            self._write()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled:
            self._write(final=True)

    def _at_exit(self) -> None:
        if not self._done and self._where == _here():
            self._write(final=True)

    def _write(self, final: bool = False) -> None:
        if self.sweep_dir is None or not _is_global_zero() or not _job_dirs(self.sweep_dir):
            return  # no sweep, not the sweep's rank 0 (srun-started sweeps), or no job has started
        try:
            _, md = write_summary(self.sweep_dir)
            if final:
                self._done = True
                log.info("sweep summary: %s", md)
        except Exception as e:
            log.warning("sweep summary: could not write it into %s: %s", self.sweep_dir, e)
