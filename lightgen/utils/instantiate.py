"""Start-up: building objects from configs, errors reduced to one sentence, known warnings quieted."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightgen.utils.errors import LightgenConfigError, first_line


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
        print(f"{prog}: error: {first_line(cause)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def quiet_known_warnings() -> None:
    """Silence Lightning messages that do not apply to lightgen's design."""
    for pattern in (
        r".*module\(s\) in eval mode.*",  # the EMA copy is in eval mode on purpose
        r".*isinstance\(treespec, LeafSpec\).*",
        r".*does not have many workers.*",  # in-memory datasets need none
        r".*predict returned None.*",  # lightgen.sample writes its batches to disk
        r".*local_dir_use_symlinks.*",  # diffusers passes a deprecated huggingface_hub argument
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
