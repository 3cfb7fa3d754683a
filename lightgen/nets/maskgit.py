"""MaskGIT's bidirectional token transformer (Chang et al., CVPR 2022), after the official Flax code.

Layout, numerics and parameter names follow google-research/maskgit ``maskgit/nets/maskgit_transformer.py``
(``Transformer``, ``Embed``, ``Attention``, ``Mlp``, ``MlmLayer``, ``TransformerLayer``): a BERT encoder
without segment ids or next-sentence head.

* Embeddings: ``word_embeddings(ids) + position_embeddings(0..L-1)`` -> ``embeddings_ln`` -> dropout.
* Each layer, post-LN (BERT): ``x = LN(x + Dropout(Attn(x)))`` then ``x = LN(x + Dropout(MLP(x)))`` with
  ``MLP = Dense(mlp_dim) -> GELU -> Dense(hidden)``; the attention is multi-head self-attention with
  separate query/key/value/out denses (with biases), no mask (bidirectional), dropout on its
  probabilities, computed by ``F.scaled_dot_product_attention``.
* MLM head: ``Dense(hidden) -> GELU -> LN``, then ``logits = h @ word_embeddings.weight.T + mlm_bias``
  (the output matrix is the input embedding matrix: tied, no second copy in the state dict).
* GELU: the official code calls ``jax.nn.gelu`` with its default ``approximate=True``, i.e. the **tanh
  approximation**; here ``F.gelu(..., approximate="tanh")`` in the MLP and in the MLM head.
* Init as official: truncated normal (+-2 sigma) with std ``init_std`` = 0.02 for every dense kernel
  and both embedding tables (``nn.init.trunc_normal_(std, a=-2 std, b=2 std)``; the empirical std of
  such a draw is 0.88 * 0.02 = 0.0176), zero biases (also ``mlm_bias``), LayerNorm weight 1 / bias 0,
  LayerNorm eps 1e-12 everywhere.

One token space (official ``ImageNet_class_conditional_generator``): ``vocab_size = codebook_size +
num_classes + 1`` -- image codes ``[0, K)``, class tokens ``K + label``, the mask token last
(``mask_token_id = vocab_size - 1``, the official ``-1`` indexes the last row). The class token is
prepended at position 0, so the position table has ``seq_len = 1 + token_size**2`` rows; the logits of
position 0 are dropped. lightgen's addition for classifier-free guidance (off by default, then the net
is the official one): with ``cfg_dropout > 0`` one more row, the null class (label ``num_classes``,
token ``K + num_classes``), sits before the mask row, and in training each label is replaced by the null
label with probability ``cfg_dropout`` (``torch.rand`` on the default generator, as DiT's
:class:`~lightgen.nets.layers.LabelEmbedder`).

Training-time differences from Flax (no effect in eval): Flax drops attention probabilities with one
mask broadcast over batch and heads (``broadcast_dropout=True``), SDPA draws one per batch and head; the
random streams differ anyway.

Flax parameter path (``params/...``) -> torch state-dict name (a converter maps these key for key;
``i`` = layer index; Flax ``Dense`` kernels are (in, out), torch weights (out, in), so transpose; the
attention's ``DenseGeneral`` kernels are (D, heads, head_dim) for query/key/value and
(heads, head_dim, D) for out, biases (heads, head_dim): flatten the head axes first; LayerNorm
``scale`` -> ``weight``):

=============================================================  ===============================================
``Embed_0/word_embeddings/embedding``                          ``embed.word_embeddings.weight``
``Embed_0/position_embeddings/embedding``                      ``embed.position_embeddings.weight``
``Embed_0/embeddings_ln/{scale,bias}``                         ``embed.embeddings_ln.{weight,bias}``
``TransformerLayer_i/Attention_0/self_attention/query/*``      ``layers.i.attention.self_attention.query.*``
``TransformerLayer_i/Attention_0/self_attention/key/*``        ``layers.i.attention.self_attention.key.*``
``TransformerLayer_i/Attention_0/self_attention/value/*``      ``layers.i.attention.self_attention.value.*``
``TransformerLayer_i/Attention_0/self_attention/out/*``        ``layers.i.attention.self_attention.out.*``
``TransformerLayer_i/Attention_0/attention_output_ln/*``       ``layers.i.attention.attention_output_ln.*``
``TransformerLayer_i/Mlp_0/intermediate_output/{kernel,bias}``  ``layers.i.mlp.intermediate_output.{weight,bias}``
``TransformerLayer_i/Mlp_0/layer_output/{kernel,bias}``         ``layers.i.mlp.layer_output.{weight,bias}``
``TransformerLayer_i/Mlp_0/layer_output_ln/{scale,bias}``       ``layers.i.mlp.layer_output_ln.{weight,bias}``
``MlmLayer_0/mlm_dense/{kernel,bias}``                          ``mlm_layer.mlm_dense.{weight,bias}``
``MlmLayer_0/mlm_ln/{scale,bias}``                              ``mlm_layer.mlm_ln.{weight,bias}``
``MlmLayer_0/mlm_bias/bias``                                    ``mlm_layer.mlm_bias.bias``
=============================================================  ===============================================

(``*`` = ``kernel`` -> ``weight``, ``bias`` -> ``bias``, or ``scale`` -> ``weight`` for the LayerNorms.)
The official ImageNet 256 model (``maskgit_class_cond_config``: 24 layers, 768 wide, 16 heads, MLP 3072,
dropout 0.1, K = 1024, 1000 classes, 16 x 16 tokens) is ``conf/model/maskgit_base.yaml``: 172,457,193
parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_heads, check_positive_int, eager

__all__ = [
    "MaskGIT",
    "MaskGITAttention",
    "MaskGITBias",
    "MaskGITEmbed",
    "MaskGITLayer",
    "MaskGITMlmLayer",
    "MaskGITMlp",
    "MaskGITSelfAttention",
]

_OWNER = "MaskGIT"


class MaskGITEmbed(nn.Module):
    """Official ``Embed``: word + learned absolute position embeddings -> LayerNorm -> dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, dropout: float, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.embeddings_ln = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.dropout(self.embeddings_ln(x))


class MaskGITSelfAttention(nn.Module):
    """Flax ``SelfAttention``: query/key/value/out denses with biases, softmax(q k^T / sqrt(d)) v, no mask."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, heads, L, head_dim)
            return t.view(n, length, self.num_heads, width // self.num_heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        return self.out(o.transpose(1, 2).reshape(n, length, width))


class MaskGITAttention(nn.Module):
    """Official ``Attention``: ``LN(x + Dropout(SelfAttention(x)))`` (post-LN)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, attention_dropout: float, eps: float):
        super().__init__()
        self.self_attention = MaskGITSelfAttention(hidden_size, num_heads, attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.attention_output_ln = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention_output_ln(self.dropout(self.self_attention(x)) + x)


class MaskGITMlp(nn.Module):
    """Official ``Mlp``: ``LN(x + Dropout(Dense(GELU_tanh(Dense(x)))))`` (post-LN)."""

    def __init__(self, hidden_size: int, mlp_dim: int, dropout: float, eps: float):
        super().__init__()
        self.intermediate_output = nn.Linear(hidden_size, mlp_dim)
        self.layer_output = nn.Linear(mlp_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.layer_output_ln = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer_output(F.gelu(self.intermediate_output(x), approximate="tanh"))
        return self.layer_output_ln(self.dropout(h) + x)


class MaskGITLayer(nn.Module):
    """Official ``TransformerLayer``: :class:`MaskGITAttention` then :class:`MaskGITMlp`."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_dim: int, dropout: float, attention_dropout: float, eps: float
    ):
        super().__init__()
        self.attention = MaskGITAttention(hidden_size, num_heads, dropout, attention_dropout, eps)
        self.mlp = MaskGITMlp(hidden_size, mlp_dim, dropout, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x))


class MaskGITBias(nn.Module):
    """Official ``Bias``: a learnable (features,) bias added to the last axis (zero-initialised)."""

    def __init__(self, features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class MaskGITMlmLayer(nn.Module):
    """Official ``MlmLayer``: ``Dense -> GELU_tanh -> LN``, then logits against the (tied) embedding matrix + bias."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.mlm_dense = nn.Linear(hidden_size, hidden_size)
        self.mlm_ln = nn.LayerNorm(hidden_size, eps=eps)
        self.mlm_bias = MaskGITBias(vocab_size)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        h = self.mlm_ln(F.gelu(self.mlm_dense(x), approximate="tanh"))
        return self.mlm_bias(h @ embeddings.t())


def _check_rate(name: str, value, upper_inclusive: bool = False) -> float:
    """A probability config field: in [0, 1) (or [0, 1] with ``upper_inclusive``), else one sentence."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0)
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{_OWNER}: {name}={value!r} must be a probability in {interval} (e.g. model.{name}=0.1).")
    return float(value)


def _check_positive_float(name: str, value, example: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{_OWNER}: {name}={value!r} must be a positive number (e.g. model.{name}={example}).")
    return float(value)


class MaskGIT(nn.Module):
    """MaskGIT's class-conditional bidirectional transformer over VQ tokens (official ``Transformer``).

    Config fields (keyword arguments): ``codebook_size`` K and ``token_size`` h (= w) of the tokenizer,
    ``num_classes``, ``hidden_size``, ``depth``, ``num_heads``, ``mlp_dim``, ``dropout`` (embeddings and
    the residual branches), ``attention_dropout`` (attention probabilities), ``cfg_dropout`` (label
    dropout for classifier-free guidance; 0 = official, no null class), ``layer_norm_eps``, ``init_std``.

    Attributes: ``codebook_size``, ``num_classes``, ``token_size``, ``num_tokens`` (h*w), ``vocab_size``
    (K + num_classes + 1, + 1 with cfg_dropout > 0), ``mask_token_id`` (vocab_size - 1), ``null_class``
    (None, or ``num_classes`` with cfg_dropout > 0), ``seq_len`` (1 + h*w, the position table length).

    ``forward(tokens, t=None, y=None)``: ``tokens`` (N, h*w) or (N, h, w) integer codes in [0, K) or
    ``mask_token_id``; ``t`` is ignored (lightgen's processes and guider call ``net(x, t, y=...)``);
    ``y`` (N,) labels in [0, num_classes) or ``null_class``. Returns (N, h*w, vocab_size) logits of the
    image positions (the class position 0 is dropped); callers slice ``[..., :K]``.
    """

    def __init__(
        self,
        *,
        codebook_size: int,
        num_classes: int,
        token_size: int,
        hidden_size: int = 768,
        depth: int = 24,
        num_heads: int = 16,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        cfg_dropout: float = 0.0,
        layer_norm_eps: float = 1e-12,
        init_std: float = 0.02,
    ):
        super().__init__()
        tokenizer_hint = "it follows the tokenizer (first_stage.{0}); set model.{0} to match"
        self.codebook_size = check_positive_int(
            _OWNER, "codebook_size", codebook_size, tokenizer_hint.format("codebook_size") + "."
        )
        self.token_size = check_positive_int(
            _OWNER, "token_size", token_size, tokenizer_hint.format("token_size") + "."
        )
        self.num_classes = check_positive_int(
            _OWNER, "num_classes", num_classes, "it follows the data (data.num_classes); set model.num_classes."
        )
        self.hidden_size = check_positive_int(_OWNER, "hidden_size", hidden_size)
        self.depth = check_positive_int(_OWNER, "depth", depth)
        self.num_heads = check_positive_int(_OWNER, "num_heads", num_heads)
        self.mlp_dim = check_positive_int(_OWNER, "mlp_dim", mlp_dim)
        check_heads(_OWNER, self.hidden_size, self.num_heads)
        self.dropout = _check_rate("dropout", dropout)
        self.attention_dropout = _check_rate("attention_dropout", attention_dropout)
        self.cfg_dropout = _check_rate("cfg_dropout", cfg_dropout, upper_inclusive=True)
        self.layer_norm_eps = _check_positive_float("layer_norm_eps", layer_norm_eps, "1e-12")
        self.init_std = _check_positive_float("init_std", init_std, "0.02")

        self.num_tokens = self.token_size**2
        self.seq_len = 1 + self.num_tokens
        self.null_class: int | None = self.num_classes if self.cfg_dropout > 0 else None
        self.vocab_size = self.codebook_size + self.num_classes + 1 + int(self.null_class is not None)
        self.mask_token_id = self.vocab_size - 1

        eps = self.layer_norm_eps
        self.embed = MaskGITEmbed(self.vocab_size, self.hidden_size, self.seq_len, self.dropout, eps)
        self.layers = nn.ModuleList(
            MaskGITLayer(self.hidden_size, self.num_heads, self.mlp_dim, self.dropout, self.attention_dropout, eps)
            for _ in range(self.depth)
        )
        self.mlm_layer = MaskGITMlmLayer(self.hidden_size, self.vocab_size, eps)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: truncated normal (+-2 std) kernels and embeddings, zero biases, LN (1, 0)."""
        std = self.init_std

        def _init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, MaskGITBias):
                nn.init.zeros_(m.bias)

        self.apply(_init)

    # -- conditioning -------------------------------------------------------------------------------
    def token_drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability ``cfg_dropout`` (the LabelEmbedder draw)."""
        drop = (torch.rand(labels.shape[0]) < self.cfg_dropout).to(labels.device)
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def class_tokens(self, y: torch.Tensor) -> torch.Tensor:
        """(N,) labels -> (N,) class token ids ``K + label`` (label dropout in training with cfg_dropout > 0)."""
        if self.training and self.null_class is not None:
            y = self.token_drop(y)
        return y + self.codebook_size

    # -- input checks -------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(
                f"{_OWNER}: tokens must be integer code indices (a LongTensor), got dtype {tokens.dtype}; "
                "pass the tokenizer's indices (first_stage.encode_to_indices), not images or latents."
            )
        if tokens.ndim == 3:
            tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.ndim != 2:
            raise ValueError(
                f"{_OWNER}: tokens must have shape (N, {self.num_tokens}) or (N, {self.token_size}, "
                f"{self.token_size}), got {tuple(tokens.shape)}; pass a batch of token grids."
            )
        length = tokens.shape[1]
        if length != self.num_tokens:
            side = math.isqrt(length)
            if side * side == length:
                got, fix = f"a {side}x{side} grid", f"model.token_size={side}"
            else:
                got, fix = "not a square grid", "model.token_size to the tokenizer's grid side"
            relation = "longer than" if length + 1 > self.seq_len else "not"
            raise ValueError(
                f"{_OWNER}: got {length} tokens per image ({got}), {relation} the {self.num_tokens} of the "
                f"{self.token_size}x{self.token_size} grid this net was built for (position table of {self.seq_len} "
                f"with the class token); set {fix} (it follows first_stage.token_size) or use the first_stage "
                "whose tokens these are."
            )
        bad = (tokens < 0) | ((tokens >= self.codebook_size) & (tokens != self.mask_token_id))
        if eager() and bool(bad.any()):
            value = int(tokens[bad][0])
            raise ValueError(
                f"{_OWNER}: token id {value} is neither an image code in [0, {self.codebook_size}) nor the mask id "
                f"{self.mask_token_id}; check that model.codebook_size equals the tokenizer's "
                "(first_stage.codebook_size) and mask with net.mask_token_id."
            )
        return tokens.long()

    def _check_labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        if y is None:
            raise ValueError(
                f"{_OWNER}: class labels y are required (the net is class-conditional); call net(tokens, t, y=labels)"
                + (
                    f" (y = {self.null_class}, the null class, for unconditional logits)."
                    if self.null_class is not None
                    else "."
                )
            )
        y = torch.as_tensor(y, device=self.embed.word_embeddings.weight.device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.shape != (n,):
            raise ValueError(
                f"{_OWNER}: class labels must be an integer tensor of shape ({n},) for a batch of {n}, got "
                f"{y.dtype} of shape {tuple(y.shape)}; pass one label per image."
            )
        top = self.num_classes if self.null_class is None else self.num_classes + 1
        if eager() and n and (int(y.min()) < 0 or int(y.max()) >= top):
            allowed = f"[0, {self.num_classes})" + (
                f" or {self.null_class} (null_class)" if self.null_class is not None else ""
            )
            raise ValueError(
                f"{_OWNER}: class labels must be in {allowed}, got values in [{int(y.min())}, {int(y.max())}]; "
                "check that model.num_classes equals data.num_classes (and use cfg_dropout > 0 for a null class)."
            )
        return y

    # -- forward ------------------------------------------------------------------------------------
    def forward(
        self, tokens: torch.Tensor, t: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, h*w) or (N, h, w) tokens, ignored ``t``, (N,) labels -> (N, h*w, vocab_size) logits."""
        del t  # MaskGIT's net is not conditioned on the step; the argument keeps lightgen's net(x, t, y) call
        tokens = self._check_tokens(torch.as_tensor(tokens))
        y = self._check_labels(y, tokens.shape[0]).to(tokens.device, torch.long)
        input_ids = torch.cat([self.class_tokens(y)[:, None], tokens], dim=1)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        # the MLM head works per position: apply it to the image positions only (position 0 is the class)
        return self.mlm_layer(x[:, 1:], self.embed.word_embeddings.weight)
