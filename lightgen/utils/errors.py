"""One error type for bad input: a single sentence that names the problem and the fix."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable


class LightgenConfigError(ValueError):
    """Raised at start-up, before any work or any write, when the input cannot work."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def message_of(exc: BaseException) -> str:
    """The one sentence to show: the first line, or, for an error re-raised from a DataLoader worker (whose text
    is torch's "Caught ... in DataLoader worker process" plus the worker's traceback), the original message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and " " not in head else last
    return first_line(exc)


@contextlib.contextmanager
def work_errors(prog: str, kept: Callable[[], str] | None = None):
    """Errors while an entry point works that are not bugs: one line on stderr, no traceback.

    Bad input found only when it is reached (a corrupt image, a damaged shard): :class:`LightgenConfigError`,
    exit status 2. A failed write or read (a full disk, a quota, a vanished mount): ``OSError``, exit status 1.
    Every write is atomic, so what was written before stays as it was; ``kept()`` says what that is.
    """
    try:
        yield
    except LightgenConfigError as e:
        print(f"{prog}: error: {message_of(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as e:
        text = e.strerror if e.strerror and e.filename else message_of(e)
        where = f" ({e.filename})" if e.filename and str(e.filename) not in text else ""
        note = f"; {kept()}" if kept is not None else ""
        print(f"{prog}: error: {text}{where}{note}.", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
