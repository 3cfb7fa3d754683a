"""One error type for bad input: a single sentence that names the problem and the fix."""

from __future__ import annotations


class LightgenConfigError(ValueError):
    """Raised at start-up, before any work or any write, when the input cannot work."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
