"""One error type for bad input: a single sentence that names the problem and the fix."""

from __future__ import annotations


class LightgenConfigError(ValueError):
    """Raised at start-up, before any work or any write, when the input cannot work."""
