"""Writes that never leave a half-written file under the final name."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write) -> None:
    """``write(file)`` into a unique temporary file next to ``path``, fsync, rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for (a full disk reports no file name)
        tmp.unlink(missing_ok=True)
        if e.filename is None or Path(str(e.filename)) == tmp:
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}", str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
