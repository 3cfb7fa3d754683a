"""Shared test helpers: compose configs, run the CLI entry points in subprocesses."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests never touch the network or a user's W&B account; they run single-threaded per process
# so two subprocesses (DDP) share the 2 CI cores fairly.
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
os.environ.setdefault("HYDRA_FULL_ERROR", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def compose(overrides: list[str] | None = None, config_name: str = "train"):
    """The composed config, as `python -m lightgen.<config_name>` would see it (no Hydra runtime)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def run_cli(entry: str, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None):
    """Run ``python -m lightgen.<entry> args...`` from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"lightgen.{entry}", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lightgen.{entry} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "i" * array.ndim, *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped folder: 200 train / 50 test images of 28x28 with labels 0..9."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


SMOKE = ["experiment=smoke", "logger=csv"]


def tree_digest(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> digest): "nothing there was changed" in one ``==``."""
    import hashlib

    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def wandb_records(path: Path):
    """Every record of an offline W&B run's ``.wandb`` file (LevelDB-log framing of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending + payload)
            pending = b""
            yield record
        elif kind in (2, 3):  # FIRST, MIDDLE
            pending += payload


@pytest.fixture(scope="session")
def token_dir(tmp_path_factory):
    """Tokens of the 256 synthetic images under a random vq_fashion (no checkpoint: random weights), extracted
    once for the token methods' end-to-end tests (MaskGIT, VQ-Diffusion)."""
    import json

    out = tmp_path_factory.mktemp("vq_fashion_tokens") / "tokens"
    run_cli("extract", "data=synthetic", "first_stage=vq_fashion", f"out={out}", "batch_size=64", "progress=false")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "tokens" and manifest["num_samples"] == 256
    return out
