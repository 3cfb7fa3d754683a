"""The token methods' LightningModule: MaskGIT and VQ-Diffusion (token net + token process + VQ tokenizer).

The same module as the Gaussian methods (:class:`~lightgen.methods.diffusion.DiffusionModule`: EMA,
optimiser, per-rank RNG, checkpoints, exact resume, rank-averaged logging, ``generate`` for
``lightgen.sample``, the sample grid and the FID callback); only what the process works on changes:

* x0 is a map of code indices, (N, h, w) longs: ``batch["tokens"]`` of pre-extracted tokens
  (``data=tokens``), or the tokenizer's ``encode_to_indices`` of ``batch["image"]``;
* samples are token maps of the tokenizer's grid, decoded to images by ``decode_indices``;
* guidance combines what the process names (``logits`` for MaskGIT, ``log_probs`` for VQ-Diffusion).

Which method it is, is the process (``diffusion=maskgit`` or ``diffusion=vq_diffusion``): the module has no
method branch; ``method=maskgit`` and ``method=vq_diffusion`` are this module with each method's EMA and
sampling defaults.
"""

from __future__ import annotations

import torch

from lightgen.methods.diffusion import DiffusionModule

TOKENIZER_API = ("encode_to_indices", "decode_indices", "codebook_size", "token_size")


class TokenModule(DiffusionModule):
    """A token net, a token process, a VQ tokenizer, EMA and an optimiser (args: :class:`DiffusionModule`).

    At construction, one sentence each when the first stage is not a VQ tokenizer, when the net's
    codebook differs from the tokenizer's, or when the tokenizer's grid does not fit the net's
    position table; the tokenizer is then frozen (no gradients, eval mode).
    """

    def check_parts(self) -> None:
        fs, net, process = self.first_stage, self.net, self.process
        if getattr(process, "data_kind", "latents") != "tokens":
            raise ValueError(
                f"the token module (method=maskgit or vq_diffusion) trains token processes, but diffusion is "
                f"{type(process).__name__}, which models latents; select diffusion=maskgit or vq_diffusion (or "
                f"method=diffusion for the Gaussian methods)."
            )
        missing = [a for a in TOKENIZER_API if not hasattr(fs, a)]
        if missing:
            name = getattr(fs, "name", type(fs).__name__)
            raise ValueError(
                f"the token methods need a VQ tokenizer, but first_stage={name} has no {', '.join(missing)}; "
                f"select first_stage=vq_fashion, vq_small or vqgan_f16_1024."
            )
        k_net, k_fs = int(getattr(net, "codebook_size", -1)), int(fs.codebook_size)
        if k_net != k_fs:
            raise ValueError(
                f"the net models {k_net} codes but the tokenizer first_stage={fs.name} has {k_fs}; set "
                f"model.codebook_size={k_fs} (the model configs take it from first_stage.codebook_size)."
            )
        need, have = int(fs.token_size) ** 2, int(getattr(net, "num_tokens", fs.token_size**2))
        if need != have:
            raise ValueError(
                f"first_stage={fs.name} makes {fs.token_size}x{fs.token_size} = {need} tokens per image but the net's "
                f"position table holds {have}; set model.token_size={fs.token_size} (the model configs take it from "
                f"first_stage.token_size)."
            )
        self.freeze_first_stage()

    def freeze_first_stage(self) -> None:
        """The tokenizer is fixed in stage 2: no gradients, always in eval mode."""
        self.first_stage.requires_grad_(False)
        self.first_stage.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()
        return self

    def batch_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (N, h, w) code indices of a batch: pre-extracted tokens, or the tokenizer's of its images."""
        if "tokens" in batch:
            return batch["tokens"]
        if "image" in batch:
            with torch.no_grad():
                return self.first_stage.encode_to_indices(batch["image"])
        raise ValueError(
            f"a token method needs batches of tokens (data=tokens) or images, but this one holds {', '.join(batch)}; "
            f"extract tokens with `python -m lightgen.extract first_stage=<tokenizer> ...` and use data=tokens."
        )

    def sample_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.first_stage.token_size, self.first_stage.token_size)

    def decode_samples(self, x0: torch.Tensor) -> torch.Tensor:
        return self.first_stage.decode_indices(x0)
