"""VQ-Diffusion's class-conditional denoiser (Gu et al., CVPR 2022; Tang et al., Improved VQ-Diffusion).

Layout, numerics, initialisation and parameter names follow microsoft/VQ-Diffusion
``image_synthesis/modeling/transformers/transformer_utils.py`` (``Condition2ImageTransformer``, ``Block``
with ``attn_type='selfcondition'``, ``AdaLayerNorm``, ``FullAttention``, ``Conv_MLP``, ``GELU2``) and
``image_synthesis/modeling/embeddings/dalle_mask_image_embedding.py`` (``DalleMaskImageEmbedding``) as
configured by ``configs/imagenet.yaml``:

* Content embedding: ``emb`` has K + 1 rows (K code classes, the mask class K last); learned
  ``height_emb`` (S rows) and ``width_emb`` (S rows) of an S x S position table. Position p gets
  ``height_emb[p // S] + width_emb[p % S]``: the official code builds the S x S table row-major and takes
  its first L entries. With the ImageNet config (S = 32, a 16 x 16 token grid) the 256 positions are the
  first 8 rows x 32 columns of the 32 x 32 table, not the 16 x 16 grid -- reproduced here on purpose
  (``spatial_size`` = S, default ``token_size``, where the two readings agree).
* Each block (pre-LN): ``x = x + Attn(AdaLN_t(x, t))`` then ``x = x + MLP(AdaLN_y(x, y))``.
  ``AdaLN(x, c) = LayerNorm(x, no affine) * (1 + scale) + shift`` with
  ``scale, shift = chunk(Linear(SiLU(emb[c])), 2)`` (scale first). ``emb`` is a learned table:
  ``nn.Embedding(num_timesteps, d)`` for the step (``timestep_type: adalayernorm``) and
  ``nn.Embedding(class_number, d)`` for the class (``class_type: adalayernorm``).
* Attention: multi-head self-attention (``key``, ``query``, ``value``, ``proj`` with biases), no mask, no
  cross-attention (the class enters only through ``ln2``); dropout on the probabilities (``attn_pdrop``) and
  after ``proj`` (``resid_pdrop``); computed by ``F.scaled_dot_product_attention``.
* MLP: ``conv_mlp`` (official ImageNet) -- the tokens as an h x w map, ``conv2(GELU2(conv1(x)))`` with 3 x 3
  convolutions (padding 1) d -> mlp_hidden_times * d -> d, then dropout; or ``fc`` -- ``Linear -> GELU2 ->
  Linear -> Dropout``. ``GELU2(x) = x * sigmoid(1.702 x)``.
* Head: ``to_logits = LayerNorm -> Linear(d, K)``: the mask class is never predicted. The output is
  (N, K, L) (``rearrange(logits, 'b l c -> b c l')``): class dimension 1.
* Init (official ``_init_weights`` applied by ``self.apply`` over the module tree): every ``nn.Linear`` and
  ``nn.Embedding`` weight ``normal(0, 0.02)``, Linear biases 0, affine LayerNorms (1, 0); the convolutions
  keep PyTorch's default init. Modules are created in the official order (in a block: ``ln1``, ``attn``,
  ``ln2``, ``mlp``; registered as ``ln1``, ``ln2``, ``attn``, ``mlp`` like the official placeholder ``ln2``),
  so a given seed gives the official initial weights.

The null class (classifier-free guidance, label ``num_classes``): with ``learnable_null=False`` (the released
``imagenet_pretrained.pth``: ``class_number = 1000``) the class table has ``num_classes`` rows and the null
label uses the **mean** of its rows, as the official ``AdaLayerNorm.forward`` does for ``timestep >=
class_number`` (Improved VQ-Diffusion's zero-shot guidance; the official code decides on ``timestep[0]``
for the whole batch, here per sample, which is the same for its all-null batches). With
``learnable_null=True`` (``imagenet_learnable.pth``: the inference script sets ``class_number = 1001``) the
table has a learned null row. Label dropout for training the null row is officially the dataset's (it
replaces labels by 1000 with ``drop_caption_rate``); here it is the net's ``cfg_dropout`` (as lightgen's
DiT and MaskGIT do it), which draws the same Bernoulli per label and leaves the parameters unchanged.

Official key layout. The released checkpoint holds ``ckpt["model"]`` (``C_DALLE``), whose ``transformer`` is
the ``DiffusionTransformer`` whose ``transformer`` is this net, so the net's keys are
``transformer.transformer.<key>``; ``ckpt["ema"]`` is the EMA of the ``DiffusionTransformer``, so there they
are ``transformer.<key>``. The ``DiffusionTransformer``'s own buffers (``log_at``, ..., ``Lt_history``,
``Lt_count``) belong to the process; its ``condition_emb`` (``ClassEmbedding(identity=True)``) has no
parameters. The ``<key>`` names, identical here (``i`` = block index), load with ``strict=True``:

==========================================================  ===========================================
``content_emb.emb.weight``                                   (K + 1, d) code + mask embedding
``content_emb.height_emb.weight``, ``...width_emb.weight``   (S, d) each, S = spatial_size
``blocks.i.ln1.emb.weight``                                  (num_timesteps, d) step table
``blocks.i.ln1.linear.{weight,bias}``                        (2d, d), (2d,): scale then shift
``blocks.i.ln2.emb.weight``                                  (class_number, d) class table
``blocks.i.ln2.linear.{weight,bias}``                        (2d, d), (2d,)
``blocks.i.attn.{key,query,value,proj}.{weight,bias}``       (d, d), (d,)
``blocks.i.mlp.conv1.{weight,bias}``                         (hd, d, 3, 3), (hd,), hd = mlp_hidden_times * d
``blocks.i.mlp.conv2.{weight,bias}``                         (d, hd, 3, 3), (d,)
(``mlp_type: fc``: ``blocks.i.mlp.0.*``, ``blocks.i.mlp.2.*``)  (hd, d), (d, hd)
``to_logits.0.{weight,bias}``                                (d,) LayerNorm
``to_logits.1.{weight,bias}``                                (K, d), (K,)
==========================================================  ===========================================

The official ImageNet 256 model (``conf/model/vq_diffusion_imagenet.yaml``: 24 blocks, d = 512, 16 heads,
conv-MLP x 4, T = 100, S = 32, 16 x 16 tokens of taming's f16 VQGAN pruned to K = 974 codes, 1000 classes)
has 518,025,678 parameters, 518,037,966 with ``learnable_null`` (24 more class rows of 512).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import check_heads, check_positive_int, eager

__all__ = [
    "GELU2",
    "VQDiffusion",
    "VQDiffusionAdaLayerNorm",
    "VQDiffusionAttention",
    "VQDiffusionBlock",
    "VQDiffusionContentEmbedding",
    "VQDiffusionConvMLP",
]

_OWNER = "VQ-Diffusion"
MLP_TYPES = ("conv_mlp", "fc")


class GELU2(nn.Module):
    """Official ``GELU2``: ``x * sigmoid(1.702 x)`` (the sigmoid approximation of GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VQDiffusionContentEmbedding(nn.Module):
    """Official ``DalleMaskImageEmbedding`` (``pos_emb_type='embedding'``): code embedding + row + column tables.

    Position p of the sequence is ``height_emb[p // S] + width_emb[p % S]`` (the first L entries of the
    row-major S x S table, S = ``spatial_size``).
    """

    def __init__(self, num_embed: int, spatial_size: int, embed_dim: int):
        super().__init__()
        self.num_embed = num_embed + 1  # the mask class is the last row (official num_embed + 1)
        self.spatial_size = spatial_size
        self.emb = nn.Embedding(self.num_embed, embed_dim)
        self.height_emb = nn.Embedding(spatial_size, embed_dim)
        self.width_emb = nn.Embedding(spatial_size, embed_dim)

    def position_embeddings(self, length: int) -> torch.Tensor:
        """(length, D): the first ``length`` entries of the row-major S x S table ``height[r] + width[c]``."""
        p = torch.arange(length, device=self.emb.weight.device)
        return self.height_emb.weight[p // self.spatial_size] + self.width_emb.weight[p % self.spatial_size]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.emb(index) + self.position_embeddings(index.shape[1])[None]


class VQDiffusionAdaLayerNorm(nn.Module):
    """Official ``AdaLayerNorm`` (learned table, ``emb_type`` without ``abs``).

    ``LayerNorm(x) * (1 + scale) + shift`` with ``scale, shift = chunk(linear(silu(emb[c])), 2)``; a
    condition ``c >= rows`` (the null class of a table without a null row) uses the mean of the table's rows.
    """

    def __init__(self, n_embd: int, rows: int):
        super().__init__()
        self.emb = nn.Embedding(rows, n_embd)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(n_embd, n_embd * 2)
        self.layernorm = nn.LayerNorm(n_embd, elementwise_affine=False)
        self.rows = rows

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """(N,) ids -> (N, D) table rows; ids ``>= rows`` get the mean row (official fallback)."""
        beyond = c >= self.rows  # no branch on it: no host sync per forward, one graph under torch.compile
        rows = self.emb(c.clamp(max=self.rows - 1))
        return torch.where(beyond[:, None], self.emb.weight.mean(dim=0, keepdim=True), rows)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        emb = self.linear(self.silu(self.condition(c))).unsqueeze(1)
        scale, shift = torch.chunk(emb, 2, dim=2)
        return self.layernorm(x) * (1 + scale) + shift


class VQDiffusionAttention(nn.Module):
    """Official ``FullAttention`` (non-causal): key/query/value/proj with biases, dropout on probs and output."""

    def __init__(self, n_embd: int, n_head: int, attn_pdrop: float, resid_pdrop: float):
        super().__init__()
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.attn_drop = nn.Dropout(attn_pdrop)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, heads, L, head_dim)
            return t.view(n, length, self.n_head, width // self.n_head).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.query(x)),
            heads(self.key(x)),
            heads(self.value(x)),
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )
        return self.resid_drop(self.proj(o.transpose(1, 2).reshape(n, length, width)))


class VQDiffusionConvMLP(nn.Module):
    """Official ``Conv_MLP``: the L tokens as a sqrt(L) x sqrt(L) map, 3x3 conv -> act -> 3x3 conv, dropout."""

    def __init__(self, n_embd: int, mlp_hidden_times: int, act: nn.Module, resid_pdrop: float):
        super().__init__()
        hidden = int(mlp_hidden_times * n_embd)
        self.conv1 = nn.Conv2d(n_embd, hidden, kernel_size=3, stride=1, padding=1)
        self.act = act
        self.conv2 = nn.Conv2d(hidden, n_embd, kernel_size=3, stride=1, padding=1)
        self.dropout = nn.Dropout(resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        side = math.isqrt(length)
        x = x.transpose(1, 2).reshape(n, d, side, length // side)  # b (h w) c -> b c h w
        x = self.conv2(self.act(self.conv1(x)))
        return self.dropout(x.flatten(2).transpose(1, 2))  # b c h w -> b (h w) c


class VQDiffusionBlock(nn.Module):
    """Official ``Block`` (``attn_type='selfcondition'``): AdaLN(step) before attention, AdaLN(class) before the MLP."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        diffusion_step: int,
        class_number: int,
        mlp_type: str,
        mlp_hidden_times: int,
        attn_pdrop: float,
        resid_pdrop: float,
    ):
        super().__init__()
        self.ln1 = VQDiffusionAdaLayerNorm(n_embd, diffusion_step)
        # official creation order: ln1, attn, ln2 (random stream); ln2 is registered before attn (the official
        # Block first assigns a plain LayerNorm placeholder to ln2, then replaces it)
        attn = VQDiffusionAttention(n_embd, n_head, attn_pdrop, resid_pdrop)
        self.ln2 = VQDiffusionAdaLayerNorm(n_embd, class_number)
        self.attn = attn
        if mlp_type == "conv_mlp":
            self.mlp = VQDiffusionConvMLP(n_embd, mlp_hidden_times, GELU2(), resid_pdrop)
        else:
            hidden = int(mlp_hidden_times * n_embd)
            self.mlp = nn.Sequential(
                nn.Linear(n_embd, hidden), GELU2(), nn.Linear(hidden, n_embd), nn.Dropout(resid_pdrop)
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x, t))
        return x + self.mlp(self.ln2(x, y))


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{_OWNER}: {name}={value!r} must be a probability in [0, 1) (official 0: model.{name}=0.0).")
    return float(value)


def _is_integer_tensor(x: torch.Tensor) -> bool:
    return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)


class VQDiffusion(nn.Module):
    """VQ-Diffusion's class-conditional denoiser over VQ tokens (official ``Condition2ImageTransformer``).

    Config fields (keyword arguments): ``codebook_size`` K (code classes, without the mask) and
    ``token_size`` h (= w) of the tokenizer, ``num_classes``, ``spatial_size`` (side S of the position
    tables, >= token_size; None = token_size; the ImageNet config's 32), ``num_timesteps`` T (rows of the
    step table), ``hidden_size``, ``depth``, ``num_heads``, ``mlp_type`` (``conv_mlp`` | ``fc``),
    ``mlp_hidden_times``, ``learnable_null`` (one more class row for the null label), ``attn_pdrop`` and
    ``resid_pdrop`` (official 0), ``cfg_dropout`` (label dropout in training: each label becomes the null
    label with this probability; officially the dataset's ``drop_caption_rate``, 0 in the ImageNet config).

    Attributes: ``codebook_size`` (K), ``num_tokens`` (L = h*w), ``mask_token_id`` (K), ``num_classes``,
    ``null_class`` (= num_classes, always: the mean class row or the learned null row),
    ``class_number`` (rows of the class table: num_classes, + 1 with learnable_null), ``num_timesteps``,
    ``token_size``, ``spatial_size``.

    ``forward(tokens, t, y)``: ``tokens`` (N, L) or (N, h, w) integer ids in [0, K] (K = mask), ``t`` (N,)
    integer steps in [0, T) (a scalar is broadcast), ``y`` (N,) labels in [0, num_classes] (num_classes =
    null) -> (N, K, L) float logits over the code classes (class dimension 1, as the official net; the
    process applies ``log_softmax``).
    """

    def __init__(
        self,
        *,
        codebook_size: int,
        num_classes: int,
        token_size: int,
        spatial_size: int | None = None,
        num_timesteps: int = 100,
        hidden_size: int = 512,
        depth: int = 24,
        num_heads: int = 16,
        mlp_type: str = "conv_mlp",
        mlp_hidden_times: int = 4,
        learnable_null: bool = False,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        cfg_dropout: float = 0.0,
    ):
        super().__init__()
        tokenizer_hint = "it follows the tokenizer (first_stage.{0}); set model.{0} to match."
        self.codebook_size = check_positive_int(
            _OWNER, "codebook_size", codebook_size, tokenizer_hint.format("codebook_size")
        )
        self.token_size = check_positive_int(_OWNER, "token_size", token_size, tokenizer_hint.format("token_size"))
        self.num_classes = check_positive_int(
            _OWNER, "num_classes", num_classes, "it follows the data (data.num_classes); set model.num_classes."
        )
        if spatial_size is None:
            spatial_size = self.token_size
        self.spatial_size = check_positive_int(
            _OWNER, "spatial_size", spatial_size, "the side of the position tables (null = model.token_size)."
        )
        if self.spatial_size < self.token_size:
            raise ValueError(
                f"{_OWNER}: spatial_size={self.spatial_size} gives a {self.spatial_size}x{self.spatial_size} position "
                f"table, too small for the {self.token_size}x{self.token_size} token grid; set model.spatial_size >= "
                f"{self.token_size} (or null for token_size)."
            )
        self.num_timesteps = check_positive_int(
            _OWNER, "num_timesteps", num_timesteps, "the rows of the step table, the process's T (official 100)."
        )
        self.hidden_size = check_positive_int(_OWNER, "hidden_size", hidden_size)
        self.depth = check_positive_int(_OWNER, "depth", depth)
        self.num_heads = check_positive_int(_OWNER, "num_heads", num_heads)
        check_heads(_OWNER, self.hidden_size, self.num_heads)
        if mlp_type not in MLP_TYPES:
            raise ValueError(
                f"{_OWNER}: mlp_type={mlp_type!r} is not one of {', '.join(MLP_TYPES)} "
                "(official ImageNet: model.mlp_type=conv_mlp)."
            )
        self.mlp_type = mlp_type
        self.mlp_hidden_times = check_positive_int(_OWNER, "mlp_hidden_times", mlp_hidden_times)
        if not isinstance(learnable_null, bool):
            raise ValueError(
                f"{_OWNER}: learnable_null={learnable_null!r} must be true or false (model.learnable_null=true "
                "adds a learned null-class row)."
            )
        self.learnable_null = learnable_null
        self.attn_pdrop = _check_rate("attn_pdrop", attn_pdrop)
        self.resid_pdrop = _check_rate("resid_pdrop", resid_pdrop)
        self.cfg_dropout = _check_rate("cfg_dropout", cfg_dropout)

        self.num_tokens = self.token_size**2
        self.mask_token_id = self.codebook_size
        self.null_class = self.num_classes
        self.class_number = self.num_classes + int(learnable_null)

        d = self.hidden_size
        self.content_emb = VQDiffusionContentEmbedding(self.codebook_size, self.spatial_size, d)
        self.blocks = nn.ModuleList(
            VQDiffusionBlock(
                d,
                self.num_heads,
                self.num_timesteps,
                self.class_number,
                self.mlp_type,
                self.mlp_hidden_times,
                self.attn_pdrop,
                self.resid_pdrop,
            )
            for _ in range(self.depth)
        )
        self.to_logits = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, self.codebook_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """Official ``_init_weights``: Linear / Embedding weights normal(0, 0.02), Linear biases 0, affine LN (1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    # -- input checks -------------------------------------------------------------------------------
    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        side, grid = self.token_size, f"{self.token_size}x{self.token_size}"
        if not _is_integer_tensor(tokens):
            raise TypeError(
                f"{_OWNER}: tokens must be integer code indices (a LongTensor), got dtype {tokens.dtype}; pass the "
                "tokenizer's indices (first_stage.encode_to_indices) with the mask id net.mask_token_id."
            )
        if tokens.ndim == 3 and tuple(tokens.shape[1:]) != (side, side):
            h, w = tokens.shape[1:]
            fix = f"model.token_size={h}" if h == w else "a square grid"
            raise ValueError(
                f"{_OWNER}: got a {h}x{w} token grid, but the net was built for {grid} (position table "
                f"{self.spatial_size}x{self.spatial_size}); use {fix} (it follows first_stage.token_size) or the "
                "first_stage whose tokens these are."
            )
        if tokens.ndim == 3:
            tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.ndim != 2:
            raise ValueError(
                f"{_OWNER}: tokens must have shape (N, {self.num_tokens}) or (N, {side}, {side}), got "
                f"{tuple(tokens.shape)}; pass a batch of token grids."
            )
        length = tokens.shape[1]
        if length != self.num_tokens:
            root = math.isqrt(length)
            fix = f"model.token_size={root}" if root * root == length else "model.token_size to the tokenizer's side"
            raise ValueError(
                f"{_OWNER}: got {length} tokens per image, but the net was built for the {self.num_tokens} of a "
                f"{grid} grid (position table {self.spatial_size}x{self.spatial_size}); set {fix} (it follows "
                "first_stage.token_size) or use the first_stage whose tokens these are."
            )
        if eager() and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > self.mask_token_id):
            bad = int(tokens[(tokens < 0) | (tokens > self.mask_token_id)][0])
            raise ValueError(
                f"{_OWNER}: token id {bad} is neither a code in [0, {self.codebook_size}) nor the mask id "
                f"{self.mask_token_id}; check that model.codebook_size equals the tokenizer's "
                "(first_stage.codebook_size) and mask with net.mask_token_id."
            )
        return tokens.long()

    def _check_steps(self, t, n: int, device: torch.device) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(n)
        if not _is_integer_tensor(t) or t.shape != (n,):
            raise ValueError(
                f"{_OWNER}: timesteps must be an integer tensor of shape ({n},) for a batch of {n}, got {t.dtype} of "
                f"shape {tuple(t.shape)}; pass the step indices in [0, {self.num_timesteps})."
            )
        if eager() and n and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"{_OWNER}: timesteps must be in [0, {self.num_timesteps}), got values in [{int(t.min())}, "
                f"{int(t.max())}]; check that model.num_timesteps equals the process's number of steps."
            )
        return t.long()

    def _check_labels(self, y, n: int, device: torch.device) -> torch.Tensor:
        if y is None:
            raise ValueError(
                f"{_OWNER}: class labels y are required (the net is class-conditional); call net(tokens, t, y=labels) "
                f"(y = {self.null_class}, the null class, for unconditional logits)."
            )
        y = torch.as_tensor(y, device=device)
        if not _is_integer_tensor(y) or y.shape != (n,):
            raise ValueError(
                f"{_OWNER}: class labels must be an integer tensor of shape ({n},) for a batch of {n}, got {y.dtype} "
                f"of shape {tuple(y.shape)}; pass one label per image."
            )
        if eager() and n and (int(y.min()) < 0 or int(y.max()) > self.null_class):
            raise ValueError(
                f"{_OWNER}: class labels must be in [0, {self.num_classes}) or {self.null_class} (null_class), got "
                f"values in [{int(y.min())}, {int(y.max())}]; check that model.num_classes equals data.num_classes."
            )
        return y.long()

    def label_drop(self, labels: torch.Tensor) -> torch.Tensor:
        """Each label becomes the null label with probability ``cfg_dropout`` (``torch.rand`` on the default
        generator, as DiT's LabelEmbedder and lightgen's MaskGIT draw it)."""
        drop = (torch.rand(labels.shape[0]) < self.cfg_dropout).to(labels.device)
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) or (N, h, w) ids in [0, K], (N,) steps, (N,) labels -> (N, K, L) logits."""
        tokens = self._check_tokens(torch.as_tensor(tokens))
        n, device = tokens.shape[0], tokens.device
        t = self._check_steps(t, n, device)
        y = self._check_labels(y, n, device)
        if self.training and self.cfg_dropout > 0:
            y = self.label_drop(y)
        x = self.content_emb(tokens)
        for block in self.blocks:
            x = block(x, t, y)
        return self.to_logits(x).transpose(1, 2)
