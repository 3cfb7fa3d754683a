"""Writing large ``.npz`` archives without holding them in memory.

``np.savez`` needs every array in RAM (50,000 samples of 256x256x3 are 9.8 GB). :func:`write_npz_streaming`
writes the same file format -- an uncompressed zip of ``.npy`` members, as ``np.savez`` produces and
ADM's evaluator reads -- from chunks, atomically (temporary file + rename).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from lightgen.utils.io import atomic_write


class NpzMember:
    """One array of the archive: its final shape and dtype and an iterable of chunks along axis 0."""

    def __init__(
        self, shape: tuple[int, ...], dtype, chunks: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = chunks


def write_npz_streaming(path: str | Path, members: dict[str, NpzMember | np.ndarray]) -> None:
    """Write ``members`` (name -> array or :class:`NpzMember`) as ``path`` (``np.load``-compatible)."""

    def write(f) -> None:
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, member in members.items():
                if isinstance(member, np.ndarray):
                    member = NpzMember(member.shape, member.dtype, [member])
                header = {
                    "descr": np.lib.format.dtype_to_descr(member.dtype),
                    "fortran_order": False,
                    "shape": member.shape,
                }
                with zf.open(f"{name}.npy", mode="w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(out, header)
                    chunks = member.chunks() if callable(member.chunks) else member.chunks
                    rows = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=member.dtype)
                        if chunk.shape[1:] != member.shape[1:]:
                            raise ValueError(f"{name}: chunk of shape {chunk.shape} does not fit {member.shape}.")
                        out.write(chunk.tobytes())
                        rows += len(chunk)
                    if rows != member.shape[0]:
                        raise ValueError(f"{name}: wrote {rows} rows, expected {member.shape[0]}.")

    atomic_write(path, write)
