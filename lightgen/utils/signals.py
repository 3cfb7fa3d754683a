"""Stopping on SIGTERM / SIGINT (and SIGUSR1 under SLURM) without losing finished work.

Two modes, one handler per process:

- **immediate** (the default, and every phase outside the training loop -- start-up, FID at the end,
  ``lightgen.sample`` / ``evaluate`` / ``extract``): the signal raises :class:`Terminated` at once. Everything
  those phases write is atomic (finished sample batches, shards, reference statistics, checkpoints), so the
  work already done stays on disk and a re-run of the same command goes on from it.
- **deferred** (inside ``lightgen.train``'s training loop, switched on by
  :class:`lightgen.callbacks.StepCheckpoint`): the signal is only recorded, the current step finishes, the
  checkpoint callback writes ``last.ckpt`` and then raises :class:`Terminated`. Further signals while the stop
  is pending are ignored: under DDP a rank often gets the same signal twice (from the cluster and forwarded by
  rank 0), and raising in the middle of a step would leave the other ranks waiting in a collective.

The entry points wrap their work in :func:`exit_on_terminated`, which prints one line and exits with
``128 + signal`` (143 for SIGTERM, 130 for SIGINT), the status a shell reports for a process the signal
stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(BaseException):
    """A stop signal arrived; raised where stopping is safe. A BaseException, so ``except Exception`` passes it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal_name(signum)}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _State:
    deferred = False
    requested: int | None = None  # the first stop signal received while deferred
    forward: Callable[[int], None] | None = None  # e.g. pass the signal on to DDP child processes


_state = _State()


def _handler(signum, frame) -> None:
    if _state.forward is not None:
        with contextlib.suppress(Exception):
            _state.forward(signum)
    if _state.deferred:
        if _state.requested is None:
            _state.requested = signum
        return
    raise Terminated(signum)


def requeue_signals() -> tuple[int, ...]:
    """The signals that announce the end of a SLURM job's time: SIGUSR1 (``sbatch --signal=USR1@90``) and, in a job
    submitit started (``hydra/launcher=slurm``), its preemption signal (``$SUBMITIT_PREEMPT_SIGNAL``, else USR2).
    lightgen takes them over from submitit, so one owner writes last.ckpt at a step boundary and requeues."""
    if not os.environ.get("SLURM_JOB_ID") or not hasattr(signal, "SIGUSR1"):
        return ()
    found = [signal.SIGUSR1]
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        submitit_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if submitit_signal is not None and submitit_signal not in found:
            found.append(submitit_signal)
    return tuple(found)


def stop_signals() -> tuple[int, ...]:
    """SIGTERM and SIGINT; in a SLURM job also the :func:`requeue_signals`."""
    return (*STOP_SIGNALS, *requeue_signals())


def install(forward: Callable[[int], None] | None = None) -> None:
    """(Re)install lightgen's handler for the stop signals (main thread only; elsewhere a no-op)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _state.forward = forward
    for sig in stop_signals():
        signal.signal(sig, _handler)


def set_deferred(on: bool) -> None:
    """Deferred: record the signal and let the caller stop at a safe point; immediate: raise at once."""
    _state.deferred = bool(on)


def requested() -> int | None:
    """The stop signal received while deferred, or None."""
    return _state.requested


def check() -> None:
    """Raise :class:`Terminated` if a stop was requested (call between units of work in long phases)."""
    if _state.requested is not None:
        raise Terminated(_state.requested)


def reset() -> None:
    _state.deferred, _state.requested, _state.forward = False, None, None


@contextlib.contextmanager
def exit_on_terminated(
    prog: str, kept: Callable[[], str] | None = None, forward: Callable[[int], None] | None = None
) -> Iterator[None]:
    """Install the handler; on :class:`Terminated` print one line (what was kept) and exit with 128 + signal.

    ``forward(signum)`` passes a signal on (e.g. to the DDP processes a launcher started).
    """
    install(forward=forward)
    try:
        yield
    except Terminated as e:
        note = ""
        if kept is not None:
            with contextlib.suppress(Exception):
                note = kept()
        print(f"{prog}: {e}{'; ' + note if note else ''}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    finally:
        reset()
