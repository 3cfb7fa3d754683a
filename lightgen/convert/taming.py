"""Import of taming-transformers VQGAN checkpoints into diffusers' ``VQModel`` layout.

A taming VQGAN checkpoint is a Lightning file ``{"state_dict": …}`` whose keys are ``encoder.*``,
``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.weight`` and the training
loss ``loss.*`` (LPIPS and discriminator, ignored here). diffusers' ``Encoder``/``Decoder`` are the same
network under other names; :func:`taming_to_diffusers_vq` renames (strictly: every taming tensor lands on
exactly one diffusers tensor of the same shape, up to the 1×1-conv → linear squeeze of attention):

=============================================  ==================================================
taming                                          diffusers ``VQModel``
=============================================  ==================================================
``encoder.down.{i}.block.{j}.*``                ``encoder.down_blocks.{i}.resnets.{j}.*``
``encoder.down.{i}.attn.{j}.*``                 ``encoder.down_blocks.{i}.attentions.{j}.*``
``encoder.down.{i}.downsample.conv``            ``encoder.down_blocks.{i}.downsamplers.0.conv``
``decoder.up.{i}.block.{j}.*`` (L levels)       ``decoder.up_blocks.{L-1-i}.resnets.{j}.*``
``decoder.up.{i}.attn.{j}.*``                   ``decoder.up_blocks.{L-1-i}.attentions.{j}.*``
``decoder.up.{i}.upsample.conv``                ``decoder.up_blocks.{L-1-i}.upsamplers.0.conv``
``{en,de}coder.mid.block_1`` / ``attn_1`` /     ``{en,de}coder.mid_block.resnets.0`` / ``attentions.0`` /
``block_2``                                     ``resnets.1``
``{en,de}coder.norm_out``                       ``{en,de}coder.conv_norm_out``
resnet ``nin_shortcut`` (1×1)                   resnet ``conv_shortcut``
attention ``norm``, ``q``, ``k``, ``v``,        ``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``
``proj_out`` (1×1 convs, C×C×1×1)               (linear, C×C)
=============================================  ==================================================

``conv_in``, ``conv_out``, resnet ``norm1/conv1/norm2/conv2``, ``quant_conv``, ``post_quant_conv`` and
``quantize.embedding.weight`` keep their names. The decoder's level order is reversed because taming
numbers levels by resolution (0 = full size) in both halves, diffusers by execution order.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lightgen.utils.errors import LightgenConfigError

_TAMING_MARKERS = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight")
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
_MID_NAMES = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
_LINEAR_ATTN = {"to_q", "to_k", "to_v", "to_out.0"}


# ---------------------------------------------------------------------------------------------
# Recognising layouts
# ---------------------------------------------------------------------------------------------
def is_taming_vqgan(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` has taming's VQGAN keys (``encoder.down.0.block.0…`` and a VQ codebook)."""
    return (
        all(k in state_dict for k in _TAMING_MARKERS)
        and "quantize.embedding.weight" in state_dict
        and any(k.startswith("encoder.down.0.block.0.") for k in state_dict)
    )


def is_diffusers_vq(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is a diffusers ``VQModel``'s (``encoder.down_blocks…`` and a VQ codebook)."""
    return "quantize.embedding.weight" in state_dict and any(k.startswith("encoder.down_blocks.") for k in state_dict)


def _prefixes(state_dict: Mapping[str, Any], n: int = 3) -> str:
    counts = Counter(k.split(".", 1)[0] for k in state_dict)
    return ", ".join(f"{p!r} ({c})" for p, c in counts.most_common(n))


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """A short phrase naming what a (non-VQ) state dict holds, for one-sentence errors."""
    keys = list(state_dict)
    if not keys:
        return "no tensors"
    if "x_embedder.proj.weight" in state_dict and any(k.startswith("blocks.") for k in keys):
        return "a DiT checkpoint (x_embedder, blocks)"
    if "quantize.embed.weight" in state_dict:
        return "a taming Gumbel-VQ model (quantize.embed), which lightgen does not import"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        if "quant_conv.weight" in state_dict and not any(k.startswith("quantize.") for k in keys):
            return "a KL autoencoder (encoder/decoder without a quantize codebook), not a VQ model"
        return f"an encoder/decoder without a VQ codebook ({len(keys)} tensors)"
    return f"{len(keys)} tensors with keys starting {_prefixes(state_dict)}, not a VQ model"


def describe_vq_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The architecture of a diffusers-layout VQ state dict, in words."""
    k, d = state_dict["quantize.embedding.weight"].shape
    levels = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", key)))
    widths = [
        int(state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
        for i in range(levels)
        if f"encoder.down_blocks.{i}.resnets.0.conv1.weight" in state_dict
    ]
    attn = sorted(
        {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.down_blocks\.(\d+)\.attentions\.", key))}
    )
    return f"a VQ model with block_out_channels={widths}, attention_levels={attn} and a {k} x {d} codebook"


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------
def _taming_levels(state_dict: Mapping[str, Any], half: str) -> int:
    part = "down" if half == "encoder" else "up"
    found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{half}\.{part}\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


def _rename_block(rest: str) -> str:
    """``block.{j}.x`` / ``attn.{j}.x`` / ``downsample.conv`` / ``upsample.conv`` inside one level."""
    m = re.fullmatch(r"block\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        return f"resnets.{m.group(1)}.{_RESNET_NAMES.get(m.group(2), m.group(2))}.{m.group(3)}"
    m = re.fullmatch(r"attn\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m and m.group(2) in _ATTN_NAMES:
        return f"attentions.{m.group(1)}.{_ATTN_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(down|up)sample\.conv\.(weight|bias)", rest)
    if m:
        return f"{m.group(1)}samplers.0.conv.{m.group(2)}"
    raise KeyError(rest)


def _rename(key: str, levels: dict[str, int]) -> str:
    for half in ("encoder", "decoder"):
        if not key.startswith(half + "."):
            continue
        rest = key[len(half) + 1 :]
        m = re.match(r"(down|up)\.(\d+)\.(.*)", rest)
        if m:
            i = int(m.group(2))
            j = i if half == "encoder" else levels[half] - 1 - i
            return f"{half}.{m.group(1)}_blocks.{j}.{_rename_block(m.group(3))}"
        m = re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(\w+)\.(weight|bias)", rest)
        if m:
            inner = m.group(2)
            inner = _ATTN_NAMES.get(inner, inner) if m.group(1) == "attn_1" else _RESNET_NAMES.get(inner, inner)
            return f"{half}.mid_block.{_MID_NAMES[m.group(1)]}.{inner}.{m.group(3)}"
        if rest.startswith("norm_out."):
            return f"{half}.conv_norm_out.{rest[len('norm_out.') :]}"
        if re.fullmatch(r"conv_(in|out)\.(weight|bias)", rest):
            return key
        raise KeyError(key)
    if re.fullmatch(r"(post_)?quant_conv\.(weight|bias)|quantize\.embedding\.weight", key):
        return key
    raise KeyError(key)


def taming_to_diffusers_vq(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a taming VQGAN state dict (``loss.*`` dropped) to diffusers ``VQModel`` keys.

    Attention q/k/v/proj_out 1×1 conv weights (C, C, 1, 1) become linear weights (C, C). A key taming's
    VQGAN does not have (a remapping buffer, an EMA codebook's statistics, …) fails with one sentence.
    """
    levels = {h: _taming_levels(state_dict, h) for h in ("encoder", "decoder")}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key.startswith("loss."):
            continue
        try:
            new = _rename(key, levels)
        except KeyError:
            unknown.append(key)
            continue
        if new.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v") or ".to_out.0." in new:
            if new.endswith(".weight") and value.ndim == 4:
                value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    if unknown:
        raise LightgenConfigError(
            f"the taming checkpoint has {len(unknown)} keys outside the VQGAN layout lightgen imports, such as "
            f"{unknown[0]!r}; only plain VectorQuantizer VQGANs (no remap or EMA codebook) are supported."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def load_vq_file(path: Path) -> Any:
    """Read a checkpoint file on CPU (a local file only; taming's Lightning files need the full unpickler)."""
    if not path.is_file():
        raise LightgenConfigError(
            f"no VQ checkpoint at {path}; set first_stage.checkpoint to a local taming VQGAN .ckpt or a lightgen "
            f"VQ state dict (lightgen never downloads it)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:  # Lightning checkpoints (taming's) also pickle callbacks and hyper-parameters
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LightgenConfigError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"it may be truncated or not a torch file."
        ) from e


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def vq_model_state_dict(obj: Any, where: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The diffusers-``VQModel``-layout state dict held by a loaded checkpoint ``obj``.

    Recognised by keys: a taming VQGAN (converted), a diffusers ``VQModel``, a
    :class:`lightgen.first_stage.vq.VQFirstStage` (``vq.*``), or any of them under ``state_dict`` and a
    ``net.``/``first_stage.``/``module.``/``_orig_mod.`` prefix (lightgen / Lightning / DDP checkpoints).
    Anything else fails with one sentence naming what it holds.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise LightgenConfigError(
            f"checkpoint {where} holds a {type(obj).__name__}, not a state dict; pass a taming VQGAN .ckpt or a "
            f"lightgen VQ state dict."
        )
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), Mapping) else obj
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and torch.is_tensor(v)}
    candidates = [tensors]
    for prefix in ("net.", "first_stage.", "module.", "_orig_mod."):
        for cand in list(candidates):
            sub = _strip(cand, prefix)
            if sub:
                candidates.append(sub)
    for cand in candidates:
        for c in (cand, _strip(cand, "vq.")):
            if is_taming_vqgan(c):
                return taming_to_diffusers_vq(c)
            if is_diffusers_vq(c):
                return dict(c)
    raise LightgenConfigError(
        f"checkpoint {where} holds {describe_state_dict(tensors)}; first_stage.checkpoint needs a taming VQGAN "
        f"(.ckpt with encoder/decoder/quantize.embedding) or a lightgen VQ first stage."
    )
