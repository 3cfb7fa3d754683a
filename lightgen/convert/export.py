"""Export of a lightgen training run's weights to the official layouts, or (DiT) to diffusers.

``python -m lightgen.convert export ckpt=<run or .ckpt> to=official|diffusers out=<path> [use_ema=true]``

What is written (the EMA weights unless ``use_ema=false``):

* ``to=official`` -- lightgen's DiT, MDT (v1/v2) and latent DiffiT use the official parameter and
  buffer names, so the net's ``state_dict()`` *is* the official layout, persistent buffers included
  (DiT's frozen sin-cos ``pos_embed``, MDT's and DiffiT's ``relative_position_index``), in the
  official key order:

  - DiT: ``torch.save`` of the raw state dict, as the released ``DiT-XL-2-256x256.pt`` (the official
    ``sample.py`` does ``model.load_state_dict(torch.load(path))``); default name
    ``DiT-<size>-<patch>-<res>x<res>.pt``;
  - MDT: ``torch.save`` of the raw state dict, as the ADM-style ``ema_<decay>_<step>.pt`` of the
    official training (the default name; ``model<step>.pt`` for the raw weights);
  - DiffiT: a safetensors file, as the released ``diffit_<res>.safetensors``.

  ``out`` is the file, or a directory (existing, or a path without suffix) that receives the default
  name. ``<stem>.lightgen_export.json`` next to it records the source run, its step, the family, the
  net's constructor kwargs and which weights were written.
* ``to=diffusers`` (DiT only) -- a ``diffusers.DiTTransformer2DModel`` folder (``save_pretrained``:
  ``config.json`` + ``diffusion_pytorch_model.safetensors``, plus ``lightgen_export.json``) that
  ``DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(out), vae=<SD VAE>,
  scheduler=<scheduler>)`` takes. Of the two diffusers defaults that differ from the official DiT,
  the pre-MLP LayerNorm eps is a config field and is set to the official 1e-6 (``norm_eps``). The
  other, the timestep features' ``downscale_freq_shift=1`` (frequencies ``exp(-ln(1e4) i / 127)``
  instead of the official ``/ 128``), is hard-coded in diffusers' ``CombinedTimestepLabelEmbeddings``
  (no config field; no weight change can absorb it): a model reloaded with ``from_pretrained`` gives
  lightgen's ε exactly only after :func:`lightgen.convert.match_official_timestep_embedding`
  (measured max |Δε| 0). Without it the ε differs by an amount that grows with the timestep MLP's
  weights: max |Δε| 2e-4 on the tests' 2-step tiny DiT (max |ε| 0.6), but 0.07 (max |ε| 1.4) and
  4.1 (DiT-S shape, max |ε| 3.8) on nets whose weights are N(0, 0.05)-perturbed. Every diffusers
  export measures both on a random batch before the folder is moved into place (it fails unless the
  patched model matches) and records them in ``lightgen_export.json``. The sin-cos ``pos_embed`` is
  recomputed by diffusers, not loaded (checked equal). ``DiTPipeline``'s guidance uses the null class
  1000 (ImageNet's), so guided pipeline sampling needs ``num_classes=1000``.

Bad input (not a lightgen checkpoint, an unsupported net, an ``out`` that exists) raises
:class:`~lightgen.utils.errors.LightgenConfigError` before anything is written; writes go to
temporary names that are renamed into place, so a failure never leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate

from lightgen.compose import upgrade_config
from lightgen.convert.dit import dit_to_diffusers_state_dict, match_official_timestep_embedding
from lightgen.nets import DIT_CONFIGS, MDT, DiffiT, DiT
from lightgen.utils.checkpoints import load_checkpoint
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.io import atomic_write
from lightgen.utils.state_dicts import net_state_dict, state_dict_mismatch

__all__ = ["RunWeights", "export", "export_diffusers", "export_official", "official_file_name", "read_run"]

FAMILIES = {DiT: "DiT", MDT: "MDT", DiffiT: "DiffiT"}
SUPPORTED = "export supports DiT, MDT and DiffiT (latent)"
OFFICIAL_SUFFIXES = {"DiT": (".pt", ".pth"), "MDT": (".pt", ".pth"), "DiffiT": (".safetensors",)}
EXPORT_JSON = "lightgen_export.json"


@dataclass
class RunWeights:
    """One network's weights of a lightgen run, in the official key order."""

    ckpt: Path
    family: str  # DiT | MDT | DiffiT
    target: str  # the lightgen net class
    kwargs: dict  # its constructor kwargs (the run's resolved ``method.net``)
    state_dict: dict[str, torch.Tensor]
    num_heads: int
    global_step: int
    use_ema: bool
    ema_decay: float | None
    image_size: int  # of the images the run models (data.image_size), for file names

    def describe(self) -> dict:
        """What ``lightgen_export.json`` says about the source."""
        return {
            "source_ckpt": str(self.ckpt),
            "global_step": self.global_step,
            "family": self.family,
            "weights": "ema" if self.use_ema else "net",
            "ema_decay": self.ema_decay,
            "net": {"target": self.target, "kwargs": self.kwargs},
        }


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------
def _checkpoint_path(ckpt: str | os.PathLike) -> Path:
    path = Path(ckpt).expanduser()
    if path.is_dir():  # a run directory
        for candidate in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if candidate.is_file():
                return candidate.resolve()
        raise LightgenConfigError(
            f"ckpt={path} is a directory without checkpoints/last.ckpt; pass a lightgen run directory or one "
            "of its .ckpt files."
        )
    if not path.is_file():
        raise LightgenConfigError(
            f"ckpt={path} does not exist; pass a lightgen run directory or one of its .ckpt files."
        )
    return path.resolve()


def read_run(ckpt: str | os.PathLike, use_ema: bool = True) -> RunWeights:
    """The EMA (or, ``use_ema=False``, the trained) net weights of a lightgen run, checked against its net.

    ``ckpt``: a checkpoint written by ``lightgen.train`` or its run directory (``checkpoints/last.ckpt``).
    Only the network is rebuilt, on the meta device, to check the keys and shapes with the run's own
    constructor kwargs: the first stage (e.g. the SD VAE, whose weights training checkpoints leave out)
    is not needed.
    """
    path = _checkpoint_path(ckpt)
    try:
        data = load_checkpoint(path, mmap=True)
    except LightgenConfigError as e:
        cause = f"{type(e.__cause__).__name__}" if e.__cause__ is not None else "unreadable"
        raise LightgenConfigError(
            f"ckpt={path} cannot be read as a torch checkpoint ({cause}); pass a checkpoint written by lightgen.train."
        ) from None
    config = (data.get("lightgen") or {}).get("config") if isinstance(data, dict) else None
    if not isinstance(data, dict) or "state_dict" not in data or not config:
        raise LightgenConfigError(
            f"ckpt={path} is not a lightgen training checkpoint (no stored run config); pass a checkpoint written "
            "by lightgen.train (released weights need no export)."
        )
    config = upgrade_config(config)
    net_cfg = dict((config.get("method") or {}).get("net") or {})
    target = str(net_cfg.get("_target_", ""))
    try:
        family = FAMILIES.get(get_class(target))
    except Exception:  # no net (an autoencoder run) or a class this lightgen does not have
        family = None
    if family is None:
        name = target.rsplit(".", 1)[-1] if target else "no generator network"
        raise LightgenConfigError(f"ckpt={path} holds {name}, but {SUPPORTED}; export a run of one of those nets.")
    if family == "DiffiT" and not net_cfg.get("time_in_attention", True):
        raise LightgenConfigError(
            f"ckpt={path} is the DiffiT ablation model.time_in_attention=false, which has no official layout; "
            f"{SUPPORTED} with time-dependent attention."
        )
    prefix = "ema." if use_ema else "net."
    state = net_state_dict(data, prefix)
    with torch.device("meta"):
        net = instantiate(net_cfg)
    expected = net.state_dict()
    detail = state_dict_mismatch(state, expected)
    if detail:
        raise LightgenConfigError(
            f"ckpt={path}'s {prefix[:-1]} weights do not fit its own {family} config ({detail}); the file is "
            "damaged or was edited: export another checkpoint of the run."
        )
    decay = (config.get("method") or {}).get("ema_decay")
    return RunWeights(
        ckpt=path,
        family=family,
        target=net_cfg["_target_"],
        kwargs={k: v for k, v in net_cfg.items() if not k.startswith("_")},
        state_dict={k: state[k].detach().clone(memory_format=torch.contiguous_format) for k in expected},
        num_heads=int(net.num_heads),
        global_step=int(data.get("global_step", -1)),
        use_ema=use_ema,
        ema_decay=None if decay is None else float(decay),
        image_size=int((config.get("data") or {}).get("image_size") or net.input_size),
    )


# ---------------------------------------------------------------------------------------------
# to=official
# ---------------------------------------------------------------------------------------------
def official_file_name(run: RunWeights) -> str:
    """The official file name of the family: ``DiT-XL-2-256x256.pt`` (``DiT-d<depth>h<width>-...`` for
    a size without a name), MDT's ``ema_0.9999_<step>.pt`` / ``model<step>.pt``, ``diffit_256.safetensors``."""
    kw, res, step = run.kwargs, run.image_size, max(run.global_step, 0)
    if run.family == "MDT":
        return f"ema_{run.ema_decay:g}_{step:06d}.pt" if run.use_ema else f"model{step:06d}.pt"
    tail = "" if run.use_ema else "_net"
    if run.family == "DiffiT":
        return f"diffit_{res}{tail}.safetensors"
    size = next(
        (n for n, c in DIT_CONFIGS.items() if (c["depth"], c["hidden_size"]) == (kw["depth"], kw["hidden_size"])),
        f"d{kw['depth']}h{kw['hidden_size']}",
    )
    return f"DiT-{size}-{kw['patch_size']}-{res}x{res}{tail}.pt"


def _official_target(run: RunWeights, out: Path) -> Path:
    name = official_file_name(run)
    if out.is_dir() or not out.suffix:
        target = out / name
    elif out.suffix not in OFFICIAL_SUFFIXES[run.family]:
        fmt = "a safetensors file" if run.family == "DiffiT" else "a torch.save .pt file"
        name = out.with_suffix(OFFICIAL_SUFFIXES[run.family][0]).name
        raise LightgenConfigError(
            f"out={out}: the official {run.family} layout is {fmt}; name it {name} or pass a directory."
        )
    else:
        target = out
    for path in (target, _sidecar(target)):
        if path.exists():
            raise LightgenConfigError(f"out: {path} already exists; pass another out= (an export never overwrites).")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LightgenConfigError(f"out={out}: {parent} is a file, not a directory; pass another out=.")
    return target


def _sidecar(target: Path) -> Path:
    return target.with_name(f"{target.stem}.{EXPORT_JSON}")


def _json_bytes(info: dict) -> bytes:
    return (json.dumps(info, indent=2) + "\n").encode()


def export_official(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write the run's weights in the official layout of its family; returns the weights file.

    ``out``: the file (``.pt``/``.pth``; DiffiT ``.safetensors``) or a directory for the default name
    (:func:`official_file_name`). Also writes ``<stem>.lightgen_export.json`` next to it.
    """
    run = read_run(ckpt, use_ema)
    target = _official_target(run, Path(out).expanduser())
    info = {"format": "official", "file": target.name, **run.describe()}
    if run.family == "DiffiT":
        from safetensors.torch import save

        info["load"] = "safetensors.torch.load_file(file) -> DiffiT(**net.kwargs).load_state_dict(sd, strict=True)"
        write = lambda f: f.write(save(run.state_dict, metadata={"format": "pt"}))
    else:
        info["load"] = f"torch.load(file) -> {run.family}(**net.kwargs).load_state_dict(sd, strict=True)"
        write = lambda f: torch.save(run.state_dict, f)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write)
    try:
        atomic_write(_sidecar(target), lambda f: f.write(_json_bytes(info)))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------
# to=diffusers
# ---------------------------------------------------------------------------------------------
def _diffusers_kwargs(run: RunWeights) -> dict:
    """``DiTTransformer2DModel`` kwargs (``norm_eps=1e-6``); one sentence for what diffusers cannot hold."""
    from lightgen.convert.dit import diffusers_dit_kwargs

    kw = run.kwargs
    if float(kw.get("mlp_ratio", 4.0)) != 4.0:
        raise LightgenConfigError(
            f"model.mlp_ratio={kw['mlp_ratio']} cannot be exported to diffusers, whose DiTTransformer2DModel has "
            "a fixed MLP ratio of 4; use to=official."
        )
    if not float(kw.get("class_dropout_prob", 0.1)) > 0:
        raise LightgenConfigError(
            "model.class_dropout_prob=0 (no null-class row) cannot be exported to diffusers, whose "
            "DiTTransformer2DModel always has one; use to=official."
        )
    return diffusers_dit_kwargs(run.state_dict, num_heads=run.num_heads)


@torch.no_grad()
def _eps_differences(run: RunWeights, folder: Path) -> dict:
    """Max |Δε| between lightgen's net and the saved folder reloaded, without and with the timestep patch."""
    from diffusers import DiTTransformer2DModel

    net = get_class(run.target)(**run.kwargs).eval()
    net.load_state_dict(run.state_dict, strict=True)
    g = torch.Generator().manual_seed(0)
    n, size = 4, net.input_size
    x = torch.randn(n, net.in_channels, size, size, generator=g)
    t = torch.tensor([0, 1, 500, 999], dtype=torch.long)
    y = torch.randint(0, net.num_classes, (n,), generator=g)
    y[-1] = net.num_classes  # the null class
    ours = net(x, t, y)
    theirs = DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    unpatched = (theirs(x, t, y).sample - ours).abs().max().item()
    patched = (match_official_timestep_embedding(theirs)(x, t, y).sample - ours).abs().max().item()
    scale = ours.abs().max().item()
    if patched > 1e-4 * max(1.0, scale):
        raise RuntimeError(f"the diffusers export differs from lightgen's net by {patched:.3g}; nothing was written.")
    return {
        "max_abs_eps_diff_from_pretrained": unpatched,
        "max_abs_eps_diff_after_match_official_timestep_embedding": patched,
        "max_abs_eps": scale,
    }


def _diffusers_target(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise LightgenConfigError(f"out={out} is a file; to=diffusers writes a folder: pass a new directory.")
    if out.is_dir() and any(out.iterdir()):
        raise LightgenConfigError(
            f"out={out} is a directory that is not empty; pass a new or empty directory (an export never overwrites)."
        )
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LightgenConfigError(f"out={out}: {parent} is a file, not a directory; pass another out=.")
    return out


def export_diffusers(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """Write a DiT run as a ``diffusers.DiTTransformer2DModel`` folder (``save_pretrained``); returns it.

    The folder is written under a temporary name, reloaded with ``from_pretrained`` and checked against
    lightgen's net (exact after :func:`match_official_timestep_embedding`, see the module docstring),
    then renamed to ``out`` (a new or empty directory).
    """
    run = read_run(ckpt, use_ema)
    if run.family != "DiT":
        raise LightgenConfigError(
            f"to=diffusers exports DiT only (diffusers' DiTTransformer2DModel) but ckpt={run.ckpt} holds "
            f"{run.family}; use to=official."
        )
    out = _diffusers_target(Path(out).expanduser())
    kwargs = _diffusers_kwargs(run)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**kwargs)
    model.load_state_dict(dit_to_diffusers_state_dict(run.state_dict), strict=True)
    if not torch.allclose(model.pos_embed.pos_embed, run.state_dict["pos_embed"], atol=1e-6, rtol=0):
        raise LightgenConfigError(
            f"ckpt={run.ckpt}'s pos_embed is not DiT's fixed sin-cos table, which diffusers recomputes instead of "
            "loading; use to=official."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        model.save_pretrained(tmp)
        info = {
            "format": "diffusers",
            "class": "diffusers.DiTTransformer2DModel",
            "diffusers_config": kwargs,
            **run.describe(),
            "timestep_embedding": {
                "note": "diffusers hard-codes downscale_freq_shift=1 (official DiT: 0); call "
                "lightgen.convert.match_official_timestep_embedding(model) after from_pretrained for lightgen's ε",
                **_eps_differences(run, tmp),
            },
            "load": "DiTPipeline(transformer=DiTTransformer2DModel.from_pretrained(folder), vae=AutoencoderKL "
            "(e.g. stabilityai/sd-vae-ft-ema), scheduler=DDIMScheduler()); guided sampling needs num_classes=1000",
        }
        (tmp / EXPORT_JSON).write_bytes(_json_bytes(info))
        os.replace(tmp, out)  # onto a missing or empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export(ckpt: str | os.PathLike, to: str, out: str | os.PathLike, use_ema: bool = True) -> Path:
    """``to="official"`` (:func:`export_official`) or ``to="diffusers"`` (:func:`export_diffusers`)."""
    if to == "official":
        return export_official(ckpt, out, use_ema)
    if to == "diffusers":
        return export_diffusers(ckpt, out, use_ema)
    raise LightgenConfigError(f"to={to} is not an export format; pass to=official or to=diffusers.")
