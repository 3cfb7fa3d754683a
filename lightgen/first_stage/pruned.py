"""A VQ tokenizer whose codebook is pruned to the codes it uses, as VQ-Diffusion models ImageNet.

VQ-Diffusion does not model the 16,384 codes of taming's ImageNet VQGAN f16/16384 but 974 code classes
(``configs/imagenet.yaml``: ``quantize_number 974``, ``mapping_path taming_vqvae_974.pt``): a table
``full_to_quantize`` maps every code of the full codebook to a class (the 973 used codes one to one, all
others to the catch-all class 0), and a class decodes to the **first** full code mapped to it (official
``TamingVQVAE``: ``quantize_to_full``). :class:`PrunedTokenizer` wraps any tokenizer with the token
interface (``encode_to_indices`` / ``decode_indices``) and applies that table on both sides, so the token
methods see ``codebook_size`` = the number of classes. Everything else (``encode``, ``decode``, sizes,
weights) is the wrapped tokenizer's.

The table is a local file (lightgen never downloads it): the official ``.pt`` (a LongTensor of the full
codebook's length) or a ``.npy`` array of the same.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightgen.utils.errors import LightgenConfigError


def load_code_map(path: str | os.PathLike) -> torch.Tensor:
    """The full → pruned table of a ``.pt`` (official) or ``.npy`` file, as a 1-D LongTensor."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LightgenConfigError(
            f"first_stage.code_map={path} is not a file; give the local path of the code table (the official "
            f"help_folder/statistics/taming_vqvae_974.pt of microsoft/VQ-Diffusion)."
        )
    table = np.load(p) if p.suffix == ".npy" else torch.load(p, map_location="cpu", weights_only=True)
    table = torch.as_tensor(np.asarray(table) if not torch.is_tensor(table) else table)
    if table.ndim != 1 or table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise LightgenConfigError(
            f"first_stage.code_map={path} holds a {table.dtype} tensor of shape {tuple(table.shape)}, not a 1-D "
            f"integer table (one code class per code of the full codebook)."
        )
    return table.long()


class PrunedTokenizer(nn.Module):
    """A tokenizer with its codes mapped to fewer classes (official ``full_to_quantize`` / ``quantize_to_full``).

    Args:
        tokenizer: the full tokenizer (e.g. :class:`~lightgen.first_stage.vq.VQFirstStage` of taming's
            f16/16384), with ``encode_to_indices``, ``decode_indices``, ``codebook_size`` and ``token_size``.
        codebook_size: the number of code classes the table maps to (official ``quantize_number``: 974).
        code_map: path of the table (``.pt`` / ``.npy``); None builds the module, and tokenising or decoding
            then fails with one sentence asking for it (as a pretrained tokenizer without weights does).
        name: the config name used in error messages.
        checkpoint: the wrapped tokenizer's weights (the config passes it on; recorded here only).
        declared: sizes the config states for the other groups (``token_size``, ``latent_size``,
            ``latent_channels``, ``image_size``, ``channels``); each must equal the wrapped tokenizer's.
    """

    def __init__(self, tokenizer: nn.Module, codebook_size: int, code_map: str | os.PathLike | None = None,
                 name: str = "pruned", checkpoint=None, **declared):  # fmt: skip
        super().__init__()
        self.tokenizer = tokenizer
        self.name = str(name)
        self.codebook_size = int(codebook_size)
        self.full_codebook_size = int(tokenizer.codebook_size)
        if not 1 <= self.codebook_size <= self.full_codebook_size:
            raise LightgenConfigError(
                f"first_stage={self.name}: codebook_size={codebook_size} code classes must lie in [1, "
                f"{self.full_codebook_size}] (the full codebook's size); official ImageNet: 974."
            )
        wrong = [f"{k}={v} (is {getattr(tokenizer, k)})" for k, v in declared.items()
                 if v is not None and int(v) != int(getattr(tokenizer, k))]  # fmt: skip
        if wrong:
            raise LightgenConfigError(
                f"first_stage={self.name} does not match its tokenizer: {', '.join(wrong)}; fix those first_stage keys."
            )
        self.code_map = None if code_map is None else str(code_map)
        self.register_buffer("full_to_pruned", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("pruned_to_full", torch.zeros(0, dtype=torch.long), persistent=False)
        if code_map is not None:
            self.set_code_map(load_code_map(code_map), where=str(code_map))

    def set_code_map(self, table: torch.Tensor, where: str = "the given table") -> None:
        """Install a full → pruned table; each class decodes to the first code mapped to it (official)."""
        table = torch.as_tensor(table).long().flatten()
        if table.numel() != self.full_codebook_size:
            raise LightgenConfigError(
                f"the code table {where} has {table.numel()} entries but first_stage={self.name} has "
                f"{self.full_codebook_size} codes; use the table made for this tokenizer."
            )
        lo, hi = int(table.min()), int(table.max())
        if lo < 0 or hi >= self.codebook_size:
            raise LightgenConfigError(
                f"the code table {where} maps to classes [{lo}, {hi}] but first_stage.codebook_size="
                f"{self.codebook_size}; set first_stage.codebook_size={hi + 1} (the table's class count)."
            )
        first = torch.full((self.codebook_size,), -1, dtype=torch.long)
        order = torch.arange(table.numel() - 1, -1, -1)  # scatter the last index first: the first one wins
        first[table.flip(0)] = order
        if bool((first < 0).any()):
            missing = int((first < 0).nonzero()[0])
            raise LightgenConfigError(
                f"the code table {where} maps no code to class {missing} of {self.codebook_size}; set "
                f"first_stage.codebook_size to the number of classes it uses."
            )
        device = self.full_to_pruned.device
        self.full_to_pruned = table.to(device)
        self.pruned_to_full = first.to(device)

    # -- the wrapped tokenizer's sizes and first-stage interface -------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("tokenizer", "__setstate__"):
                raise
            return getattr(super().__getattr__("tokenizer"), name)

    def _require_map(self) -> None:
        if self.full_to_pruned.numel() == 0:
            raise LightgenConfigError(
                f"first_stage={self.name} maps codes to {self.codebook_size} classes but no table was given; set "
                f"first_stage.code_map=<local file> (the official taming_vqvae_{self.codebook_size}.pt)."
            )

    # -- the token interface --------------------------------------------------------------------------
    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images → code classes (N, h, w): the full tokenizer's codes through ``full_to_quantize``."""
        self._require_map()
        return self.full_to_pruned[self.tokenizer.encode_to_indices(images)]

    def to_full(self, classes: torch.Tensor) -> torch.Tensor:
        """Code classes → full codes (official ``quantize_to_full``: the first code of each class)."""
        self._require_map()
        if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= self.codebook_size):
            raise LightgenConfigError(
                f"first_stage={self.name} has {self.codebook_size} code classes, so indices must lie in [0, "
                f"{self.codebook_size}) but they span [{int(classes.min())}, {int(classes.max())}]; remove "
                f"mask/class tokens before decoding."
            )
        return self.pruned_to_full[classes.long()]

    @torch.no_grad()
    def decode_indices(self, classes: torch.Tensor) -> torch.Tensor:
        """Code classes (N, h, w) → images in [-1, 1] (each class decoded as its first full code)."""
        return self.tokenizer.decode_indices(self.to_full(classes))
