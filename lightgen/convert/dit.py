"""Import of official DiT checkpoints, and export of DiT weights to diffusers' layout.

* :func:`load_official_dit` loads a released ``DiT-XL-2-256x256.pt`` (a raw state_dict) or a
  checkpoint written by the official ``train.py`` (``{"model", "ema", "opt", "args"}``; the EMA
  weights are preferred) into a :class:`lightgen.nets.DiT` with ``strict=True``. lightgen's DiT
  uses the official parameter names, so no renaming is needed; a checkpoint of another
  architecture fails with one sentence naming both architectures.
* :func:`infer_dit_config` recovers the constructor kwargs from a state_dict's shapes.
* :func:`dit_to_diffusers_state_dict` / :func:`diffusers_dit_kwargs` map a DiT state_dict onto
  ``diffusers.DiTTransformer2DModel`` (used to cross-check the architecture and in benchmarks).
  Two numerical details of diffusers differ from the official DiT and must be set to match it
  exactly: its timestep features use ``downscale_freq_shift=1`` (frequencies
  ``exp(-ln(1e4) i / 127)`` instead of ``/128``) and its pre-MLP LayerNorm eps defaults to 1e-5
  (official 1e-6). :func:`diffusers_dit_kwargs` sets ``norm_eps=1e-6``;
  :func:`match_official_timestep_embedding` patches the frequency shift.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightgen.nets.dit import DIT_CONFIGS
from lightgen.utils.state_dicts import state_dict_mismatch

_REQUIRED_KEYS = (
    "pos_embed",
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
    "blocks.0.mlp.fc1.weight",
)


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    """``torch.load`` on CPU with ``weights_only=True``; official train.py checkpoints also hold an
    ``argparse.Namespace`` ("args"), which is allow-listed for this load only."""
    safe = getattr(torch.serialization, "safe_globals", None)
    if safe is not None:
        with safe([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    torch.serialization.add_safe_globals([argparse.Namespace])  # torch < 2.5
    return torch.load(path, map_location="cpu", weights_only=True)


def extract_dit_state_dict(path_or_state_dict: str | os.PathLike | Mapping | nn.Module) -> dict:
    """Return the DiT state_dict held by a file path, a checkpoint dict, a state_dict or a module.

    A train.py checkpoint dict yields its ``"ema"`` weights (else ``"model"``); a uniform
    ``"module."`` (DDP) or ``"_orig_mod."`` (torch.compile) key prefix is removed.
    """
    obj: Any = path_or_state_dict
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"DiT checkpoint not found at {str(path)!r}; pass the path of an official DiT .pt file "
                "(e.g. DiT-XL-2-256x256.pt from https://dl.fbaipublicfiles.com/DiT/models/)."
            )
        obj = _torch_load(path)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"Expected a DiT checkpoint path or state_dict, got {type(obj).__name__}.")
    for key in ("ema", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# ---------------------------------------------------------------------------------------------
# Architecture inference
# ---------------------------------------------------------------------------------------------
def _default_heads(hidden_size: int) -> int:
    for cfg in DIT_CONFIGS.values():
        if cfg["hidden_size"] == hidden_size:
            return cfg["num_heads"]
    return hidden_size // 64 if hidden_size % 64 == 0 else 1


def infer_dit_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor kwargs of :class:`lightgen.nets.DiT` recovered from a state_dict's shapes.

    Recovered exactly: ``input_size, patch_size, in_channels, hidden_size, depth, mlp_ratio,
    num_classes, learn_sigma``. Two values are not visible in shapes and follow the official
    conventions: ``num_heads`` (the official head count for that width, else ``hidden_size // 64``)
    and ``class_dropout_prob=0.1`` (the label table is assumed to carry the extra null-class row).
    """
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing:
        raise ValueError(
            f"This does not look like a DiT checkpoint: it lacks {', '.join(repr(k) for k in missing)}; "
            "pass an official DiT state_dict or a train.py checkpoint with an 'ema' or 'model' entry."
        )
    hidden, in_ch, p, _ = state_dict["x_embedder.proj.weight"].shape
    num_tokens = state_dict["pos_embed"].shape[1]
    grid = int(round(num_tokens**0.5))
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    out_ch = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
    mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    return {
        "input_size": grid * p,
        "patch_size": p,
        "in_channels": in_ch,
        "hidden_size": hidden,
        "depth": depth,
        "num_heads": _default_heads(hidden),
        "mlp_ratio": mlp_hidden / hidden,
        "class_dropout_prob": 0.1,
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "learn_sigma": out_ch == 2 * in_ch,
    }


def _describe(cfg: Mapping[str, Any]) -> str:
    name = next(
        (
            f"DiT-{size}/{cfg['patch_size']}"
            for size, c in DIT_CONFIGS.items()
            if c["depth"] == cfg["depth"] and c["hidden_size"] == cfg["hidden_size"]
        ),
        "DiT",
    )
    fields = ("depth", "hidden_size", "patch_size", "in_channels", "input_size", "num_classes", "learn_sigma")
    extra = "" if cfg.get("mlp_ratio", 4.0) == 4.0 else f", mlp_ratio={cfg['mlp_ratio']:g}"
    return f"{name} ({', '.join(f'{k}={cfg[k]}' for k in fields)}{extra})"


def _net_config(net: nn.Module) -> dict[str, Any]:
    try:
        return infer_dit_config(net.state_dict())
    except ValueError:
        return {}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_official_dit(net: nn.Module, path_or_state_dict: str | os.PathLike | Mapping | nn.Module) -> nn.Module:
    """Load official DiT weights into ``net`` (a :class:`lightgen.nets.DiT`) with ``strict=True``.

    ``path_or_state_dict``: a released checkpoint file (a raw state_dict), a train.py checkpoint
    (``"ema"`` preferred over ``"model"``), or an already loaded state_dict. Returns ``net``.
    Raises ValueError naming the checkpoint's architecture and the net's when they differ.
    """
    sd = extract_dit_state_dict(path_or_state_dict)
    ckpt_cfg = infer_dit_config(sd)
    target = net.state_dict()
    detail = state_dict_mismatch(sd, target)
    if detail:
        net_cfg = _net_config(net)
        net_desc = _describe(net_cfg) if net_cfg else type(net).__name__
        raise ValueError(
            f"The checkpoint looks like {_describe(ckpt_cfg)} but the network is {net_desc} "
            f"({detail}); build the network with the checkpoint's settings "
            "(see lightgen.convert.infer_dit_config) before loading."
        )
    net.load_state_dict(sd, strict=True)
    return net


# ---------------------------------------------------------------------------------------------
# diffusers export
# ---------------------------------------------------------------------------------------------
def diffusers_dit_kwargs(config_or_state_dict: Mapping[str, Any], num_heads: int | None = None) -> dict:
    """Constructor kwargs of ``diffusers.DiTTransformer2DModel`` equivalent to a DiT.

    Accepts DiT constructor kwargs (as from :func:`infer_dit_config`) or a DiT state_dict.
    ``norm_eps`` is set to the official 1e-6 (diffusers' default is 1e-5).
    """
    cfg = dict(config_or_state_dict)
    if "x_embedder.proj.weight" in cfg:
        cfg = infer_dit_config(cfg)
    heads = num_heads or cfg.get("num_heads") or _default_heads(cfg["hidden_size"])
    out_ch = cfg.get("out_channels") or (2 * cfg["in_channels"] if cfg.get("learn_sigma", True) else cfg["in_channels"])
    return {
        "num_attention_heads": heads,
        "attention_head_dim": cfg["hidden_size"] // heads,
        "in_channels": cfg["in_channels"],
        "out_channels": out_ch,
        "num_layers": cfg["depth"],
        "sample_size": cfg["input_size"],
        "patch_size": cfg["patch_size"],
        "num_embeds_ada_norm": cfg["num_classes"],
        "norm_eps": 1e-6,
    }


def dit_to_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an official/lightgen DiT state_dict to ``diffusers.DiTTransformer2DModel`` keys.

    diffusers keeps one copy of the timestep and label embedders inside every block's
    ``norm1.emb`` (the final layer reads block 0's), so those weights are replicated per block;
    the fused ``qkv`` projection is split into ``to_q/to_k/to_v``. The fixed sin-cos table is a
    non-persistent buffer in diffusers (recomputed there), so ``pos_embed`` is not exported.
    The result loads with ``strict=True``.
    """
    sd = extract_dit_state_dict(state_dict)
    depth = infer_dit_config(sd)["depth"]
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    shared = {
        "norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    }
    per_block = {
        "norm1.linear": "adaLN_modulation.1",
        "attn1.to_out.0": "attn.proj",
        "ff.net.0.proj": "mlp.fc1",
        "ff.net.2": "mlp.fc2",
    }
    for i in range(depth):
        dst, src = f"transformer_blocks.{i}.", f"blocks.{i}."
        for d, s in shared.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{d}.{leaf}"] = sd[f"{s}.{leaf}"].clone()
        out[f"{dst}norm1.emb.class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"].clone()
        for d, s in per_block.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{d}.{leaf}"] = sd[f"{src}{s}.{leaf}"]
        for leaf in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{leaf}"].chunk(3, dim=0)
            out[f"{dst}attn1.to_q.{leaf}"] = q.clone()
            out[f"{dst}attn1.to_k.{leaf}"] = k.clone()
            out[f"{dst}attn1.to_v.{leaf}"] = v.clone()
    return out


def match_official_timestep_embedding(diffusers_model: nn.Module) -> nn.Module:
    """Make a diffusers DiT use the official timestep frequencies (``exp(-ln(1e4) i / half)``).

    diffusers' ``CombinedTimestepLabelEmbeddings`` uses ``downscale_freq_shift=1`` (``/ (half-1)``);
    the official DiT divides by ``half``. Sets the shift to 0 in every block; returns the model.
    """
    for module in diffusers_model.modules():
        if hasattr(module, "downscale_freq_shift") and hasattr(module, "flip_sin_to_cos"):
            module.downscale_freq_shift = 0
    return diffusers_model
