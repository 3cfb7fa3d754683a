"""Shared building blocks of the diffusion transformers (DiT, MDT, DiffiT).

Everything here follows the official DiT code (facebookresearch/DiT, ``models.py``) in layout,
parameter names and numerics, so that official checkpoints load with ``strict=True`` and the
nets built from these blocks reproduce the official outputs:

* :func:`modulate` -- the adaLN shift/scale, per sample, broadcast over tokens.
* :func:`get_2d_sincos_pos_embed` -- the MAE 2-D sin-cos table, computed in float64 numpy.
* :class:`TimestepEmbedder` -- GLIDE sinusoidal features (cos first) followed by a 2-layer MLP.
* :class:`LabelEmbedder` -- class table with an extra "null" row and label dropout for CFG.
* :class:`ClassConditional` -- ``null_class``, what classifier-free guidance needs of a net (the
  guidance itself is :class:`lightgen.diffusion.guidance.Guider`).
* :func:`init_linears_xavier`, :func:`sincos_pos_embed`, :func:`init_embedders`, :func:`zero_init` --
  the pieces of the official ``initialize_weights`` every net repeats (each net still lists its own
  initialisation, in its own order: the order fixes the random stream).
* :func:`unpatchify` -- (N, T, p*p*C) tokens of a square grid -> (N, C, H, W) image.
* :func:`check_transformer_args` / :func:`check_net_inputs` (and the smaller checks they use) -- the
  constructor and ``forward`` validation shared by the nets, with one-sentence errors that start
  with the net's name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "LabelEmbedder",
    "TimestepEmbedder",
    "check_heads",
    "check_mlp_ratio_and_dropout",
    "check_net_inputs",
    "check_positive_int",
    "check_transformer_args",
    "divisor_hint",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "init_embedders",
    "init_linears_xavier",
    "modulate",
    "ClassConditional",
    "sincos_pos_embed",
    "unpatchify",
    "zero_init",
]


def eager() -> bool:
    """Whether to check input values (token ids, labels, timesteps) on the host: in eager mode only. Under
    ``torch.compile`` such a check would read the tensor on the host and split the graph (a sync per forward)."""
    return not torch.compiler.is_compiling()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` with (N, D) shift/scale broadcast over tokens.

    ``x`` is (N, T, D); ``shift`` and ``scale`` are (N, D).
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def unpatchify(x: torch.Tensor, patch_size: int, out_channels: int, owner: str = "unpatchify") -> torch.Tensor:
    """(N, T, p*p*C_out) tokens of a square token grid -> (N, C_out, H, W) image, H = W = sqrt(T) * p.

    Each token holds its p x p patch as ``(p, p, C_out)`` (row, column, channel), as the official
    DiT ``unpatchify``. Raises ``"{owner}: T tokens do not form a square grid."`` otherwise.
    """
    c, p = out_channels, patch_size
    h = w = int(round(x.shape[1] ** 0.5))
    if h * w != x.shape[1]:
        raise ValueError(f"{owner}: {x.shape[1]} tokens do not form a square grid.")
    x = x.reshape(x.shape[0], h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, h * p, w * p)


# ---------------------------------------------------------------------------------------------
# Sin-cos positional embeddings (MAE layout, as used by DiT / MDT)
# ---------------------------------------------------------------------------------------------
def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """1-D sin-cos features of positions ``pos`` (any shape, flattened) -> (M, embed_dim) float64.

    The first half of the channels is ``sin(pos * w_i)``, the second half ``cos(pos * w_i)`` with
    ``w_i = 10000 ** (-i / (embed_dim / 2))``, i = 0 .. embed_dim/2 - 1.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got embed_dim={embed_dim}.")
    freqs = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    freqs = 1.0 / 10000**freqs
    angles = np.outer(np.asarray(pos, dtype=np.float64).reshape(-1), freqs)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int]) -> np.ndarray:
    """2-D sin-cos positional table of a ``grid_size`` token grid -> (H*W, embed_dim) float64.

    Layout exactly as the official DiT/MAE code: the grid is built "w first" (``meshgrid`` in xy
    order), tokens are enumerated row by row (row-major over (h, w)), the first half of the
    channels encodes ``grid[0]`` (the column / x index) and the second half ``grid[1]`` (the row /
    y index); each half is a 1-D sin-cos embedding (sin first). ``grid_size`` is an int (square
    grid) or ``(h, w)``. ``embed_dim`` must be divisible by 4.
    """
    if isinstance(grid_size, int):
        gh = gw = grid_size
    else:
        gh, gw = (int(g) for g in grid_size)
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}.")
    # grid_w varies along columns, grid_h along rows; both (gh, gw); "w goes first".
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_w)  # grid[0]
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid_h)  # grid[1]
    return np.concatenate([emb_first, emb_second], axis=1)


# ---------------------------------------------------------------------------------------------
# Conditioning embedders
# ---------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Scalar (possibly fractional) timesteps -> (N, hidden_size) vectors.

    Sinusoidal GLIDE features of ``frequency_embedding_size`` channels (cos first, then sin;
    frequencies ``exp(-ln(max_period) * i / half)``), then ``mlp = Linear -> SiLU -> Linear``.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """(N,) timesteps -> (N, dim) float32 features ``[cos(t*f), sin(t*f)]`` (+1 zero if dim odd)."""
        half = dim // 2
        exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / half)
        args = t.reshape(-1, 1).float() * torch.exp(exponent).reshape(1, -1)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, hidden_size) vectors, with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` the table has ``num_classes + 1`` rows; row ``num_classes`` is the
    null (unconditional) class. In training each label is independently replaced by the null class
    with probability ``dropout_prob``; the Bernoulli draw uses ``torch.rand`` on the default (CPU)
    generator like the official code, so the random stream is the official one.
    ``force_drop_ids`` (N,) drops exactly the labels where it equals 1, in train and eval.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels by the null class ``num_classes``."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0]) < self.dropout_prob
        else:
            drop_ids = torch.as_tensor(force_drop_ids) == 1
        drop_ids = drop_ids.to(labels.device)
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)

    @property
    def null_class(self) -> int | None:
        """The null (unconditional) label, or None when the table has no null row (no label dropout)."""
        return self.num_classes if self.dropout_prob > 0 else None


class ClassConditional:
    """Mixin of the class-conditional nets (``self.y_embedder`` a :class:`LabelEmbedder`).

    ``null_class`` is the label classifier-free guidance feeds for the unconditional half, or None
    when the net was built without label dropout (then it cannot be guided).
    """

    @property
    def null_class(self) -> int | None:
        return self.y_embedder.null_class


# ---------------------------------------------------------------------------------------------
# Initialisation (the pieces of the official ``initialize_weights``)
# ---------------------------------------------------------------------------------------------
def init_linears_xavier(module: nn.Module) -> None:
    """The official ``_basic_init``: every ``nn.Linear`` in ``module`` (in ``module.apply`` order)
    gets a xavier-uniform weight and a zero bias."""

    def _basic_init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    module.apply(_basic_init)


def sincos_pos_embed(embed_dim: int, grid_size: int | Sequence[int]) -> torch.Tensor:
    """:func:`get_2d_sincos_pos_embed` as the (1, H*W, embed_dim) float32 tensor a ``pos_embed`` holds."""
    return torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float().unsqueeze(0)


def init_embedders(
    t_embedder: TimestepEmbedder, y_embedder: LabelEmbedder, x_embedder: nn.Module | None = None
) -> None:
    """The official embedder initialisation, in the official order.

    First the patch embedding (a timm ``PatchEmbed``, when given) like an ``nn.Linear`` on the
    flattened ``C*p*p`` input: xavier-uniform kernel, zero bias; then the label table and the two
    linears of the timestep MLP, each ``normal(std=0.02)``.
    """
    if x_embedder is not None:
        w = x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(x_embedder.proj.bias, 0)
    nn.init.normal_(y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)


def zero_init(*modules: nn.Module) -> None:
    """Set the weight and the bias of each module to 0 (adaLN-Zero modulations, zero-initialised heads)."""
    for module in modules:
        nn.init.constant_(module.weight, 0)
        nn.init.constant_(module.bias, 0)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def check_positive_int(owner: str, name: str, value, hint: str = "") -> int:
    """Return ``value`` as an int, or raise one clear ValueError if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ValueError(
            f"{owner}: {name}={value!r} must be a positive integer"
            + (f"; {hint}" if hint else f"; set it to a positive integer (e.g. model.{name}=...).")
        )
    return int(value)


def divisor_hint(n: int, preferred: tuple[int, ...]) -> int:
    """The first of ``preferred`` that divides ``n`` (1 if none does) -- a value to suggest in errors."""
    return next((p for p in preferred if n % p == 0), 1)


def check_heads(owner: str, width: int, num_heads: int, what: str = "hidden_size") -> None:
    """Raise if ``num_heads`` does not divide ``width``, suggesting the largest head count that does."""
    if width % num_heads:
        good = max(h for h in range(1, num_heads + 1) if width % h == 0)
        raise ValueError(
            f"{owner}: {what}={width} is not divisible by num_heads={num_heads}; choose a head count that "
            f"divides it (e.g. model.num_heads={good})."
        )


def check_mlp_ratio_and_dropout(owner: str, mlp_ratio, class_dropout_prob) -> None:
    """Raise unless ``mlp_ratio`` is a positive number and ``class_dropout_prob`` lies in [0, 1)."""
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise ValueError(f"{owner}: mlp_ratio={mlp_ratio!r} must be positive (e.g. model.mlp_ratio=4.0).")
    if not 0.0 <= float(class_dropout_prob) < 1.0:
        raise ValueError(
            f"{owner}: class_dropout_prob={class_dropout_prob!r} must be in [0, 1) (e.g. model.class_dropout_prob=0.1)."
        )


def check_transformer_args(
    owner: str,
    *,
    input_size,
    patch_size,
    in_channels,
    hidden_size,
    depth,
    num_heads,
    num_classes,
    mlp_ratio,
    class_dropout_prob,
) -> tuple[int, int, int, int, int, int, int]:
    """Validate the constructor arguments shared by the patch transformers (DiT, MDT, DiffiT).

    In this order: the seven sizes are positive integers; ``patch_size`` divides ``input_size``;
    ``num_heads`` divides ``hidden_size``; ``hidden_size`` is divisible by 4 (2-D sin-cos table);
    ``mlp_ratio`` is positive; ``class_dropout_prob`` is in [0, 1). Each failure is one
    ``ValueError`` sentence starting with ``"{owner}: "``. Returns the validated ints as
    ``(input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes)``.
    """
    input_size = check_positive_int(owner, "input_size", input_size)
    patch_size = check_positive_int(owner, "patch_size", patch_size)
    in_channels = check_positive_int(owner, "in_channels", in_channels)
    hidden_size = check_positive_int(owner, "hidden_size", hidden_size)
    depth = check_positive_int(owner, "depth", depth)
    num_heads = check_positive_int(owner, "num_heads", num_heads)
    num_classes = check_positive_int(owner, "num_classes", num_classes)
    if input_size % patch_size:
        raise ValueError(
            f"{owner}: patch_size={patch_size} does not divide the input size {input_size}; choose a patch "
            f"size that divides it (e.g. model.patch_size={divisor_hint(input_size, (2, 4, 8))})."
        )
    check_heads(owner, hidden_size, num_heads)
    if hidden_size % 4:
        raise ValueError(
            f"{owner}: hidden_size={hidden_size} must be divisible by 4 for the 2-D sin-cos position "
            f"embedding; choose e.g. model.hidden_size={hidden_size + (-hidden_size) % 4}."
        )
    check_mlp_ratio_and_dropout(owner, mlp_ratio, class_dropout_prob)
    return input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes


def check_net_inputs(owner: str, net: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Check ``forward(x, t, y)`` inputs against ``net.in_channels`` / ``net.input_size``; return ``t``.

    ``x`` must be (N, in_channels, input_size, input_size), ``y`` (N,), and ``t`` (N,) or a scalar
    (then broadcast to (N,), which is what is returned). Errors start with ``"{owner}: "``.
    """
    expected = (net.in_channels, net.input_size, net.input_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{owner}: expected input of shape (N, {expected[0]}, {expected[1]}, {expected[2]}) "
            f"(in_channels={net.in_channels}, input_size={net.input_size}), got {tuple(x.shape)}; "
            "build the model with matching model.in_channels / model.input_size."
        )
    n = x.shape[0]
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"{owner}: timesteps must have shape ({n},) for a batch of {n}, got {tuple(t.shape)}.")
    if y.shape != (n,):
        raise ValueError(f"{owner}: class labels must have shape ({n},) for a batch of {n}, got {tuple(y.shape)}.")
    return t
