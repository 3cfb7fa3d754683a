"""Finding and checking checkpoints before a run starts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightgen.utils.errors import LightgenConfigError


def load_checkpoint(path: str | Path, mmap: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LightgenConfigError(f"checkpoint {path} does not exist; check ckpt_path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # truncated file, not a torch file, ...
        raise LightgenConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated."
        ) from e


def find_resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest of ``checkpoints/last.ckpt`` and Lightning's SLURM ``hpc_ckpt_*.ckpt`` in a run dir."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    candidates = [p for p in candidates if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _describe(model_cfg: dict | None) -> str:
    if not model_cfg:
        return "an unknown"
    keys = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "input_size", "num_classes")
    target = str(model_cfg.get("_target_", "?")).rsplit(".", 1)[-1]
    fields = ", ".join(f"{k}={model_cfg[k]}" for k in keys if k in model_cfg)
    return f"a {target}({fields})"


def check_checkpoint_matches(ckpt: dict, net: nn.Module, path: str | Path, model_cfg: dict | None = None) -> None:
    """Fail with one sentence when a checkpoint holds another architecture than ``net``."""
    if net is None:  # a method without a generator network (stage-1 autoencoders): Lightning checks keys
        return
    if "state_dict" not in ckpt:
        raise LightgenConfigError(
            f"{path} is not a lightgen training checkpoint (no 'state_dict'); official weights are imported "
            f"with lightgen.convert, and ckpt_path takes checkpoints written by lightgen.train."
        )
    theirs = {k[4:]: v.shape for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    ours = {k: v.shape for k, v in net.state_dict().items()}
    if theirs != ours:
        saved_cfg = ((ckpt.get("lightgen") or {}).get("config") or {}).get("model")
        raise LightgenConfigError(
            f"checkpoint {path} holds {_describe(saved_cfg)} network but this run builds "
            f"{_describe(model_cfg)}; use the model settings it was trained with or another ckpt_path."
        )
