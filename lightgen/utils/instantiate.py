"""Building objects from configs, with start-up errors reduced to one sentence."""

from __future__ import annotations

import contextlib
import sys

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightgen.utils.errors import LightgenConfigError


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Instantiate every entry of a name -> config mapping (callbacks, loggers); null entries are skipped."""
    if not cfg:
        return []
    return [instantiate(v) for v in cfg.values() if v is not None and "_target_" in v]


def root_cause(exc: BaseException) -> BaseException:
    """Hydra wraps errors raised inside a target; the user needs the original sentence."""
    while isinstance(exc, InstantiationException) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@contextlib.contextmanager
def startup_errors(prog: str):
    """Turn bad-input errors raised at start-up into one line on stderr and exit status 2."""
    try:
        yield
    except (LightgenConfigError, ValueError, FileNotFoundError, InstantiationException) as e:
        cause = root_cause(e)
        if not isinstance(cause, (LightgenConfigError, ValueError, FileNotFoundError)):
            raise
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
