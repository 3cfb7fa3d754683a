"""Released weights of the Gaussian methods, recognised by their keys: DiT, MDT v1 / v2 and DiffiT.

* :func:`read_weights` reads a released file -- ``DiT-XL-2-{256,512}.pt`` (a raw state dict), an official DiT
  ``train.py`` checkpoint (``{"model", "ema", "opt", "args"}``), MDT's ``mdt_xl2_v{1,2}_ckpt.pt`` (a state dict or
  ``{"ema", "model"}``: EMA preferred), DiffiT's ``diffit_{256,512}.safetensors`` -- into one state dict (a DDP
  ``module.`` or compile ``_orig_mod.`` prefix dropped).
* :func:`identify` tells the family from the keys (``en_inblocks.*``: MDTv2; ``sideblocks.*`` in one ``blocks``
  list: MDT v1; ``attn.qkv_temb``: DiffiT; DiT's embedders and blocks: DiT) and derives the constructor from the
  shapes: input size, patch, channels, width, depth, MLP ratio, classes (the label table has the null row) and
  learned Σ; the head count from the relative-position tables (MDT, DiffiT) or the official count for the width
  (DiT). MDT v1 keeps encoder and decoder in one list, so its ``decode_layer`` is the official scripts' 2.
* :func:`load_released` builds the lightgen net and loads it with ``strict=True``; anything else gets one sentence
  naming what the file holds and what was expected.
* :func:`released_run_config` composes the family's ImageNet experiment around those weights, with the official
  sampling defaults (:func:`sampling_defaults`), so ``lightgen.sample`` and ``lightgen.train init_from=`` treat a
  released file as a run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lightgen.convert.dit import _default_heads, _torch_load, extract_dit_state_dict
from lightgen.utils.errors import LightgenConfigError
from lightgen.utils.state_dicts import state_dict_mismatch

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SIZES = {(12, 384): "S", (12, 768): "B", (24, 1024): "L", (28, 1152): "XL"}


@dataclass
class Released:
    """What a released file holds: the family, the lightgen net it builds and how the authors sample it."""

    family: str  # DiT | MDT | DiffiT
    name: str  # e.g. DiT-XL/2, MDTv2-XL/2, DiffiT-XL/2 (a size the papers did not name: the family alone)
    target: str  # the lightgen net class
    kwargs: dict
    experiment: str  # the conf/experiment whose recipe the weights come from
    sampling: dict = field(default_factory=dict)

    @property
    def describe(self) -> str:
        keys = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "input_size", "num_classes")
        return f"{self.name} ({', '.join(f'{k}={self.kwargs[k]}' for k in keys)})"


def sampling_defaults(family: str, input_size: int) -> dict:
    """The official sampling settings of each family's FID protocol (250 DDPM steps, 3 guided ε channels).

    DiT ``sample_ddp.py``: CFG 1.5 constant. MDT ``image_sample.py``: 3.8 with the power-cosine schedule, pow 4.
    DiffiT: 256 px (a latent grid of at most 32) 4.4 power-cosine, pow 4; 512 px 1.49 constant.
    """
    base = {"sampler": "ddpm", "steps": 250, "guidance_channels": 3, "scale_pow": 4.0}
    if family == "DiT":
        return {**base, "cfg_scale": 1.5, "cfg_schedule": "constant"}
    if family == "MDT":
        return {**base, "cfg_scale": 3.8, "cfg_schedule": "power_cosine"}
    if input_size <= 32:
        return {**base, "cfg_scale": 4.4, "cfg_schedule": "power_cosine"}
    return {**base, "cfg_scale": 1.49, "cfg_schedule": "constant"}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def is_lightgen_checkpoint(obj) -> bool:
    return isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj.get("lightgen"), Mapping)


def read_file(path: str | Path):
    """The object in a ``.pt`` / ``.pth`` / ``.ckpt`` (torch) or ``.safetensors`` file, on the CPU."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LightgenConfigError(
            f"{path} does not exist; pass a lightgen checkpoint or a released DiT / MDT / DiffiT file "
            "(e.g. DiT-XL-2-256x256.pt, mdt_xl2_v2_ckpt.pt, diffit_256.safetensors)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:
            return _torch_load(path)
        except Exception:  # a lightgen checkpoint holds more than weights-only allows (configs, callback states)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise LightgenConfigError(
            f"{path} cannot be read as a PyTorch or safetensors file ({type(e).__name__}); it may be truncated "
            "or of another format."
        ) from e


def read_weights(path_or_obj) -> dict[str, torch.Tensor]:
    """The state dict of a released file (or of an object already read): EMA preferred, prefixes dropped."""
    obj = read_file(path_or_obj) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    if not isinstance(obj, Mapping):
        raise LightgenConfigError(f"{path_or_obj} holds a {type(obj).__name__}, not a state dict.")
    return extract_dit_state_dict(obj)


# ---------------------------------------------------------------------------------------------
# Recognising
# ---------------------------------------------------------------------------------------------
def _count(sd: Mapping, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    return 1 + max(found) if found else 0


def _summary(sd: Mapping) -> str:
    heads = sorted({k.split(".")[0] for k in sd})
    more = f" and {len(heads) - 8} more" if len(heads) > 8 else ""
    return f"{len(sd)} tensors under {', '.join(heads[:8])}{more}"


def _name(family: str, depth: int, hidden: int, patch: int) -> str:
    size = SIZES.get((depth, hidden))
    return f"{family}-{size}/{patch}" if size else family


_COMMON = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight")


def identify(sd: Mapping[str, torch.Tensor], source: str = "the file") -> Released:
    """The family and the lightgen constructor of a released state dict, from its keys and shapes."""
    if not sd or any(k not in sd for k in _COMMON) or "final_layer.linear.weight" not in sd:
        raise LightgenConfigError(
            f"{source} holds {_summary(sd) if sd else 'no tensors'}, not the weights of a DiT, MDT or DiffiT "
            "network; expected a released file with pos_embed, x_embedder, t_embedder, y_embedder, blocks and "
            "final_layer (e.g. DiT-XL-2-256x256.pt, mdt_xl2_v2_ckpt.pt, diffit_256.safetensors)."
        )
    hidden, in_ch, patch, _ = sd["x_embedder.proj.weight"].shape
    grid = round(sd["pos_embed"].shape[1] ** 0.5)
    out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    common = {
        "input_size": int(grid * patch),
        "patch_size": int(patch),
        "in_channels": int(in_ch),
        "hidden_size": int(hidden),
        "class_dropout_prob": 0.1,
        "num_classes": int(sd["y_embedder.embedding_table.weight"].shape[0] - 1),
        "learn_sigma": bool(out_ch == 2 * in_ch),
    }
    if _count(sd, "en_inblocks"):  # MDTv2: encoder in/out halves with long skips, then the decoder
        first, version = "en_inblocks.0.", "v2"
        n_in, n_out, n_de = _count(sd, "en_inblocks"), _count(sd, "en_outblocks"), _count(sd, "de_blocks")
        depth, extra = n_in + n_out + n_de, {"version": "v2", "decode_layer": n_de}
    elif _count(sd, "sideblocks"):  # MDT v1: one list of blocks and the side-interpolater
        first, version = "blocks.0.", "v1"
        depth, extra = _count(sd, "blocks"), {"version": "v1", "decode_layer": 2}
    else:
        first, version = "blocks.0.", None
        depth, extra = _count(sd, "blocks"), {}
    mlp_ratio = sd[f"{first}mlp.fc1.weight"].shape[0] / hidden
    if version is not None:
        heads = sd[f"{first}attn.rel_pos_bias.relative_position_bias_table"].shape[1]
        kwargs = {**common, "depth": depth, "num_heads": int(heads), "mlp_ratio": mlp_ratio, **extra}
        name = _name("MDTv2" if version == "v2" else "MDT", depth, hidden, patch)
        return Released("MDT", name, "lightgen.nets.mdt.MDT", kwargs, "mdt_xl2_imagenet256",
                        sampling_defaults("MDT", kwargs["input_size"]))  # fmt: skip
    if f"{first}attn.qkv_temb.weight" in sd:  # DiffiT: time-dependent qkv, a relative bias per block
        heads = sd[f"{first}attn.relative_position_bias_table"].shape[1]
        kwargs = {**common, "depth": depth, "num_heads": int(heads), "mlp_ratio": mlp_ratio}
        return Released("DiffiT", _name("DiffiT", depth, hidden, patch), "lightgen.nets.diffit.DiffiT", kwargs,
                        "diffit_xl2_imagenet256", sampling_defaults("DiffiT", kwargs["input_size"]))  # fmt: skip
    if f"{first}adaLN_modulation.1.weight" in sd:
        kwargs = {**common, "depth": depth, "num_heads": _default_heads(int(hidden)), "mlp_ratio": mlp_ratio}
        return Released("DiT", _name("DiT", depth, hidden, patch), "lightgen.nets.dit.DiT", kwargs,
                        "dit_xl2_imagenet256", sampling_defaults("DiT", kwargs["input_size"]))  # fmt: skip
    raise LightgenConfigError(
        f"{source} holds {_summary(sd)}: DiT-style embedders but blocks of no known family; expected DiT "
        "(blocks.N.adaLN_modulation), MDT (en_inblocks / sideblocks) or DiffiT (blocks.N.attn.qkv_temb) weights."
    )


def build_net(rel: Released) -> nn.Module:
    from hydra.utils import instantiate

    return instantiate({"_target_": rel.target, **rel.kwargs})


def load_released(path_or_obj, net: nn.Module | None = None) -> tuple[nn.Module, Released]:
    """``(net, what)``: a released file's weights in a lightgen net (built from the shapes unless given), strict."""
    sd = read_weights(path_or_obj)
    rel = identify(sd, str(path_or_obj) if isinstance(path_or_obj, (str, Path)) else "the state dict")
    net = build_net(rel) if net is None else net
    detail = state_dict_mismatch(sd, net.state_dict())
    if detail:
        raise LightgenConfigError(
            f"{path_or_obj} holds {rel.describe}, which does not fit the network ({detail}); build the network "
            "with the file's settings (lightgen.convert.identify tells them)."
        )
    net.load_state_dict(sd, strict=True)
    return net, rel


# ---------------------------------------------------------------------------------------------
# A run around released weights
# ---------------------------------------------------------------------------------------------
def compose_train_config(overrides: list[str]):
    """``conf/train.yaml`` with ``overrides``, inside or outside a running Hydra application."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def default_first_stage(rel: Released) -> str:
    """The SD VAE ft-EMA (the decoder of the official DiT, MDT and DiffiT FID samplers) for 4-channel latents,
    else ``identity``."""
    return "sd_vae_ft_ema" if rel.kwargs["in_channels"] == 4 else "identity"


def released_run_config(rel: Released, first_stage: str | None = None) -> dict:
    """The resolved ``method`` config (and its groups) of the family's experiment around ``rel``'s net.

    ``first_stage``: a ``conf/first_stage`` option; by default the SD VAE (ft-EMA, the decoder of the three
    official FID samplers) for 4-channel latents, else ``identity`` (pixels).
    """
    from omegaconf import OmegaConf

    k = rel.kwargs
    first_stage = first_stage or default_first_stage(rel)
    latent = first_stage != "identity"
    if latent and k["in_channels"] != 4:
        raise LightgenConfigError(
            f"{rel.describe} models {k['in_channels']}-channel inputs but first_stage={first_stage} gives 4-channel "
            "latents; select first_stage=identity or a first stage of that many channels."
        )
    overrides = [
        f"experiment={rel.experiment}",
        f"first_stage={first_stage}",
        f"data.image_size={k['input_size'] * 8 if latent else k['input_size']}",
        f"data.channels={3 if latent else k['in_channels']}",
        f"data.num_classes={k['num_classes']}",
        f"diffusion.learn_sigma={str(k['learn_sigma']).lower()}",
        *(f"model.{key}={value}" for key, value in k.items()),
        *(f"method.sampling.{key}={value}" for key, value in rel.sampling.items()),
    ]
    if latent:
        overrides.append(f"first_stage.latent_size={k['input_size']}")
    cfg = compose_train_config(overrides)
    keep = ("method", "model", "first_stage", "diffusion", "schedule", "masking", "optim", "seed")
    resolved = OmegaConf.to_container(cfg, resolve=False)
    resolved.update(
        {key: OmegaConf.to_container(cfg[key], resolve=True) for key in keep if OmegaConf.is_config(cfg.get(key))}
    )
    return {key: resolved[key] for key in keep if key in resolved}
