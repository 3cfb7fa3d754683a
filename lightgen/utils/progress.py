"""Progress of lightgen's long loops outside a Trainer step: a Rich bar in a terminal, lines with an ETA in logs.

    with PhaseProgress("FID reference statistics", total=2000) as p:
        for batch in batches:
            ...
            p.advance(len(batch))

A terminal shows the bar (description, done/total, elapsed, remaining). Every ``every`` seconds and at the end, one
line -- ``FID reference statistics: 640/2000 images (32%), 0:00:51 elapsed, ETA 0:01:48`` -- goes to the run's log
file (the file handlers of the logging tree: ``<run dir>/train.log`` under Hydra) and, when the output is not a
terminal (``make demo > log``, a SLURM output file), to stdout too, so a log shows how far a phase is and how long
it still takes.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("lightgen.progress")


def progress_bar(enabled: bool = True) -> Progress:
    """Description, bar, done/total, elapsed and remaining time; prints nothing when not ``enabled``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=not enabled, transient=False)


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0.0))))


def _file_handlers() -> list[logging.Handler]:
    """The FileHandlers that a record of ``lightgen.progress`` reaches (its own, its parents', the root's)."""
    found, logger = [], log
    while logger is not None:
        found += [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        logger = logger.parent if logger.propagate else None
    return found


class PhaseProgress:
    """One long phase counted in ``unit``: a Rich bar where the console is a terminal, ETA lines for log files.

    ``enabled=False`` shows and writes nothing (non-zero ranks, tests). ``interactive`` overrides the terminal
    detection (None: Rich's ``Console.is_terminal``). ``live``: a Rich ``Progress`` already on screen (the Trainer's
    bar, during a callback) that gets this phase as one more task, since Rich draws one live display at a time.
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "images",
        enabled: bool = True,
        every: float = 30.0,
        interactive: bool | None = None,
        live: Progress | None = None,
    ):
        self.description, self.total, self.unit = description, total, unit
        self.enabled, self.every = enabled, float(every)
        if interactive is None:
            from rich import get_console

            interactive = get_console().is_terminal
        self.interactive = bool(interactive)
        self.done = 0
        self._live = live if live is not None and getattr(getattr(live, "live", None), "is_started", False) else None
        self._bar: Progress | None = None
        self._task = None
        self._t0 = self._last = 0.0

    def __enter__(self) -> PhaseProgress:
        self._t0 = self._last = time.perf_counter()
        if self.enabled and self.interactive:
            self._bar = self._live or progress_bar(True)
            if self._live is None:
                self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            if self._live is not None:  # Lightning's display redraws on request only
                self._bar.refresh()
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.every:
            self._last = now
            self.write(self.line(now - self._t0))

    def line(self, elapsed: float) -> str:
        """``<description>: done/total unit (pct%), elapsed, ETA`` (no total: the count and the rate)."""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            eta_s = _clock(eta) if eta == eta else "?"
            return (
                f"{self.description}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
                f"{_clock(elapsed)} elapsed, ETA {eta_s}"
            )
        return f"{self.description}: {self.done} {self.unit}, {_clock(elapsed)} elapsed ({rate:.1f} {self.unit}/s)"

    def write(self, line: str) -> None:
        """To the log files; to stdout as well when there is no bar to look at."""
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None)
        for handler in _file_handlers():
            if record.levelno >= handler.level:
                handler.handle(record)
        if not self.interactive:
            print(line, file=sys.stdout, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            if self._live is None:
                self._bar.stop()
            else:
                self._bar.remove_task(self._task)
                self._bar.refresh()
        if self.enabled and exc_type is None:
            elapsed = time.perf_counter() - self._t0
            rate = self.done / elapsed if elapsed > 0 else 0.0
            self.write(f"{self.description}: {self.done} {self.unit} in {_clock(elapsed)} ({rate:.1f} {self.unit}/s)")
