"""Running an entry point: Hydra's composition errors (an unknown group option, a key that is not in the
config) become one line and exit status 2, like every other bad input.

Hydra reports them itself, on several lines, and exits with status 1, which is also the status of a run that
failed while working. :func:`run` keeps what is written to stderr until the task function starts
(:func:`task_started`); when Hydra exits before that, the kept text is condensed to one line.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

_buffer: io.StringIO | None = None
_stderr = None


def task_started() -> None:
    """Called first by each Hydra task function: stderr goes back to the terminal, with what was kept so far."""
    global _buffer, _stderr
    if _buffer is None:
        return
    text = _buffer.getvalue()
    sys.stderr, _buffer = _stderr, None
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


def condense(text: str) -> str:
    """Hydra's multi-line composition error as one sentence (with the choices when it lists them)."""
    lines = [line.rstrip() for line in text.splitlines()]
    head, options, in_options = [], [], False
    for line in lines:
        if not line.strip() or "HYDRA_FULL_ERROR" in line:
            continue
        if line.startswith("Available options in"):
            in_options = True
            continue
        if line.startswith("Config search path"):
            in_options = False
            continue
        if in_options and line.startswith(("\t", " ")):
            options.append(line.strip())
        elif not line.startswith(("\t", " ")) and not in_options:
            head.append(line.strip().rstrip("."))
    sentence = "; ".join(head) or "the configuration could not be composed"
    if options:
        sentence += f"; choose one of: {', '.join(options)}"
    return sentence


def run(prog: str, hydra_main: Callable[[], object], before: Callable[[list[str]], None] | None = None) -> None:
    """``hydra_main()`` (a ``@hydra.main`` function) with composition errors as one line and exit status 2.

    ``before(overrides)`` checks the command line before Hydra creates anything (a run directory); a
    :class:`~lightgen.utils.errors.LightgenConfigError` from it is one line and exit status 2.
    """
    from lightgen.utils import signals
    from lightgen.utils.errors import LightgenConfigError

    if before is not None:
        try:
            before([a for a in sys.argv[1:] if "=" in a and not a.startswith("-")])
        except LightgenConfigError as e:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    global _buffer, _stderr
    _stderr, _buffer = sys.stderr, io.StringIO()
    sys.stderr = _buffer
    signals.install()  # a stop signal while Hydra composes: one line, exit 128 + signal, nothing written
    try:
        hydra_main()
    except signals.Terminated as e:
        task_started()
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(128 + e.signum) from None
    except SystemExit as e:
        if _buffer is not None and e.code == 1:  # Hydra gave up before the task started
            text = _buffer.getvalue()
            sys.stderr, _buffer = _stderr, None
            print(f"{prog}: error: {condense(text)}.", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise
    finally:
        task_started()
