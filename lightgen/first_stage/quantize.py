"""Vector quantizer for VQ tokenizers (VQ-VAE / VQGAN / MaskGIT), a plain ``nn.Module``.

``VectorQuantizer(z)`` takes encoder outputs ``z`` of shape (N, D, h, w) (channels first, as taming) and
returns ``(z_q, loss, info)``:

* ``z_q`` (N, D, h, w): the nearest codes with the straight-through estimator, ``z + sg[e_k - z]``, so
  ``d z_q / d z`` is the identity (with ``l2_normalize`` it is the identity with respect to the normalised z);
* ``loss``: a scalar, ``info["codebook"] + info["commitment"] + info["entropy"]``;
* ``info``: ``indices`` (N, h, w) long, ``perplexity`` (of this batch's code frequencies), ``usage`` (fraction of
  codes used in the last ``usage_window`` training batches), ``batch_usage`` (fraction used in this batch), and
  the three weighted loss terms (detached).

Loss terms, with ``sg`` the stop-gradient and ``mse`` the mean over all N·h·w·D elements:

* ``ema=False, legacy=False`` (VQ-VAE): ``β·mse(sg[e], z) + mse(e, sg[z])`` (β on the commitment term);
* ``ema=False, legacy=True`` (taming's ``VectorQuantizer2`` and diffusers' default): ``mse(sg[e], z) + β·mse(e,
  sg[z])``: β lands on the codebook term, taming's documented bug kept for checkpoint parity;
* ``ema=True``: ``β·mse(sg[e], z)`` only; the codebook is an exponential moving average of the encoder outputs
  assigned to each code (VQ-VAE-2 / Sonnet, with Laplace smoothing of the cluster sizes), updated in training
  mode and never by the optimiser (``embedding.weight.requires_grad`` is False);
* ``entropy_loss_ratio > 0`` (MaskGIT): ``ratio·(mean_i H(p_i) − H(mean_i p_i))`` with ``p_i = softmax(−d_i/τ)``
  over the squared distances ``d_i`` of vector i to all codes; it flows into both z and the codebook.

The nearest code minimises taming's ``|z|² + |e|² − 2 z·e`` without the per-vector constant ``|z|²`` (in float32,
or float64 for float64 inputs, with TF32 matmuls off). That is the same argmin as taming's and diffusers'
(``torch.cdist``), exact ties going to the lowest index in all three, and closer to the float64 argmin than either
when codes are nearly equidistant (taming's initial ±1/K codebook).

State dict: the codebook is ``embedding.weight`` (an ``nn.Embedding``), so taming's / diffusers'
``quantize.embedding.weight`` loads directly. Extra buffers: ``code_last_used`` and ``batches_seen`` (usage
window; left out with ``stats_in_state_dict=False``), ``ema_cluster_size`` / ``ema_embed_sum`` (``ema=True``),
``dead_code_usage`` (``restart_dead_codes`` without EMA), ``initialized`` (``kmeans_init``). A state dict without
these (taming's, diffusers') loads with ``strict=True``: the statistics start afresh from the loaded codebook
and a loaded codebook counts as k-means-initialised.

Distributed training: when ``torch.distributed`` is initialised with more than one process (and
``sync_distributed``), the code counts and sums behind the EMA codebook, the usage statistics and the k-means
steps are all-reduced (summed over ranks), and the random choices (k-means seeds, dead-code replacements) are
made on rank 0 and broadcast, so every rank keeps the same codebook. Collectives run in training mode only. The
entropy regulariser uses each rank's own batch.

Costs and caveats: the (N·h·w, K) distance matrix is materialised (no chunking); dead-code restarts read the
number of dead codes on the host once per training step; a restarted code of a learned (non-EMA) codebook keeps
its optimiser state (e.g. Adam moments); the TF32 switch around the lookup is a global flag (a graph break under
``torch.compile``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightgen.utils.errors import LightgenConfigError

STAT_BUFFERS = ("code_last_used", "batches_seen", "ema_cluster_size", "ema_embed_sum", "dead_code_usage", "initialized")


@contextlib.contextmanager
def _ieee_matmul(device: torch.device):
    """Full-precision float32 CUDA matmuls inside (train.py turns TF32 on; argmin over distances needs fp32)."""
    if device.type != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9
        old = mm.fp32_precision
        mm.fp32_precision = "ieee"
        try:
            yield
        finally:
            mm.fp32_precision = old
        return
    old = mm.allow_tf32
    mm.allow_tf32 = False
    try:
        yield
    finally:
        mm.allow_tf32 = old


def squared_distances(z: torch.Tensor, codes: torch.Tensor, include_z: bool = True) -> torch.Tensor:
    """(M, D), (K, D) -> (M, K): taming's ``|z|² + |e|² − 2 z·e``; without the per-row ``|z|²`` if not include_z.

    Dropping ``|z|²`` changes neither the argmin nor a row softmax, and keeps float32 precision when ``|z|²``
    dwarfs the differences between codes (taming's initial codebook is uniform in ±1/K).
    """
    d = codes.pow(2).sum(1) - 2 * (z @ codes.t())
    return d + z.pow(2).sum(1, keepdim=True) if include_z else d


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` of the code frequencies ``p = counts / counts.sum()`` (1 for a single code, K for uniform)."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def entropy_regulariser(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """MaskGIT's codebook-usage term: mean per-sample entropy minus the entropy of the batch-mean distribution.

    ``distances`` (M, K) are squared distances (a per-row constant does not matter); the distributions are
    ``softmax(−distances / temperature)``.
    Minimising it makes each assignment confident and the batch spread over many codes.
    """
    logits = -distances / temperature
    log_p = F.log_softmax(logits, dim=-1)
    p = log_p.exp()
    sample_entropy = -(p * log_p).sum(-1).mean()
    mean_p = p.mean(0)
    batch_entropy = -(mean_p * torch.log(mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny))).sum()
    return sample_entropy - batch_entropy


def _check_quantizer_args(
    codebook_size, dim, ema, ema_decay, usage_window, entropy_loss_ratio, entropy_temperature, kmeans_init, kmeans_iters
) -> None:
    """One sentence for each setting the quantizer cannot run with (before any work)."""
    if codebook_size < 1 or dim < 1:
        raise LightgenConfigError(
            f"quantizer codebook_size and dim must be positive, got codebook_size={codebook_size}, dim={dim}."
        )
    if ema and not 0.0 <= ema_decay < 1.0:
        raise LightgenConfigError(f"quantizer ema_decay must lie in [0, 1), got {ema_decay}.")
    if usage_window < 1:
        raise LightgenConfigError(f"quantizer usage_window must be at least 1 batch, got {usage_window}.")
    if entropy_loss_ratio > 0 and entropy_temperature <= 0:
        raise LightgenConfigError(
            f"quantizer entropy_temperature must be positive, got {entropy_temperature}; "
            f"set entropy_loss_ratio=0 to turn the entropy term off."
        )
    if kmeans_init and kmeans_iters < 0:
        raise LightgenConfigError(f"quantizer kmeans_iters must be >= 0, got {kmeans_iters}.")


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with the options VQ tokenizers turn on (see the module docstring).

    Args:
        codebook_size: K, the number of codes.
        dim: D, the code dimension (the encoder's output channels).
        beta: weight of the commitment term (of the codebook term with ``legacy=True`` and no EMA).
        legacy: taming's β placement (``True``, as taming and diffusers by default) or the VQ-VAE form.
        ema: EMA codebook instead of a learned one (no codebook loss term, only the commitment term).
        ema_decay, ema_eps: the EMA decay γ and the Laplace smoothing ε of the cluster sizes.
        l2_normalize: L2-normalise inputs and codes (cosine-similarity lookup, ViT-VQGAN); ``z_q`` is then a unit
            vector and the losses are between normalised vectors.
        kmeans_init: replace the codebook by k-means centroids of the first training batch (k-means++ seeding,
            then Lloyd iterations; empty clusters keep their seed).
        kmeans_iters: Lloyd iterations for ``kmeans_init``.
        restart_dead_codes: after each training step, re-initialise codes whose EMA usage (an EMA with decay
            ``ema_decay`` of the number of vectors assigned per batch) is below ``dead_code_threshold`` with random
            encoder outputs of the current batch.
        dead_code_threshold: see ``restart_dead_codes`` (1.0: on average less than one vector per batch).
        entropy_loss_ratio, entropy_temperature: MaskGIT's entropy regulariser (off at 0; MaskGIT: 0.1, 0.01).
        usage_window: ``info["usage"]`` is the fraction of codes used in the last this many training batches.
        stats_in_state_dict: keep the usage-window buffers in the state dict (so the window survives checkpoints).
        sync_distributed: all-reduce / broadcast under ``torch.distributed`` (see the module docstring).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        legacy: bool = True,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        l2_normalize: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1.0,
        entropy_loss_ratio: float = 0.0,
        entropy_temperature: float = 0.01,
        usage_window: int = 100,
        stats_in_state_dict: bool = True,
        sync_distributed: bool = True,
    ) -> None:
        super().__init__()
        _check_quantizer_args(codebook_size, dim, ema, ema_decay, usage_window, entropy_loss_ratio,
                              entropy_temperature, kmeans_init, kmeans_iters)  # fmt: skip
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = float(beta)
        self.legacy = legacy
        self.ema = ema
        self.ema_decay = float(ema_decay)
        self.ema_eps = float(ema_eps)
        self.l2_normalize = l2_normalize
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.restart_dead_codes = restart_dead_codes
        self.dead_code_threshold = float(dead_code_threshold)
        self.entropy_loss_ratio = float(entropy_loss_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.usage_window = usage_window
        self.sync_distributed = sync_distributed

        self.embedding = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # taming / diffusers
        # Usage window: the training batch (1-based) in which each code was last used.
        self.register_buffer("code_last_used", torch.zeros(codebook_size, dtype=torch.long), stats_in_state_dict)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long), stats_in_state_dict)
        if ema:
            self.embedding.weight.requires_grad_(False)
            # Start as if each code had been the nearest code of one vector equal to itself: codes = sums / sizes.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        elif restart_dead_codes:
            self.register_buffer("dead_code_usage", torch.ones(codebook_size))
        if kmeans_init:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # -- distributed helpers ----------------------------------------------------------------------------------
    def _distributed(self) -> bool:
        return self.sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self._distributed():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def _broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        if self._distributed():
            dist.broadcast(t, src=0)
        return t

    # -- lookup ---------------------------------------------------------------------------------------------
    def codes(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The codebook as used for lookup (K, D): normalised with ``l2_normalize``."""
        w = self.embedding.weight if weight is None else weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    def _flatten(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(
                f"VectorQuantizer expects z of shape (N, {self.dim}, h, w) (channels first), got {tuple(z.shape)}."
            )
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).to(torch.promote_types(z.dtype, torch.float32))
        return F.normalize(flat, dim=-1) if self.l2_normalize else flat

    def _distances(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        with _ieee_matmul(flat.device):
            return squared_distances(flat, codes.to(flat.dtype), include_z=False)

    @torch.no_grad()
    def encode_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices (N, h, w) of z (N, D, h, w); no statistics or codebook updates."""
        flat = self._flatten(z)
        return self._distances(flat, self.codes()).argmin(1).view(z.shape[0], z.shape[2], z.shape[3])

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (N, D, h, w) for indices (N, h, w) in [0, K)."""
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"VectorQuantizer.decode_indices needs integer indices, got dtype {indices.dtype}.")
        if indices.ndim != 3:
            raise ValueError(
                f"VectorQuantizer.decode_indices expects indices of shape (N, h, w), got {tuple(indices.shape)}."
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"token indices must lie in [0, {self.codebook_size}) for a codebook of {self.codebook_size} codes, "
                f"got values in [{int(indices.min())}, {int(indices.max())}]."
            )
        return F.embedding(indices.long(), self.codes()).permute(0, 3, 1, 2).contiguous()

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        flat = self._flatten(z)
        n, _, h, w = z.shape
        if self.kmeans_init and self.training and not bool(self.initialized):
            self._kmeans_initialise(flat.detach())

        weight = self.embedding.weight
        if self.training and (self.ema or self.restart_dead_codes):
            weight = weight.clone()  # updated in place below, after the graph has used it
        codes = self.codes(weight)
        want_entropy = self.entropy_loss_ratio > 0  # also under no_grad: validation losses include the term
        with contextlib.nullcontext() if want_entropy else torch.no_grad():
            distances = self._distances(flat, codes)
        indices = distances.detach().argmin(1)
        quantized = F.embedding(indices, codes).to(flat.dtype)  # (M, D); carries the codebook's gradient (no EMA)

        commitment = F.mse_loss(flat, quantized.detach())
        zero = flat.new_zeros(())
        if self.ema:
            codebook_term, commitment_term = zero, self.beta * commitment
        else:
            codebook = F.mse_loss(quantized, flat.detach())
            if self.legacy:
                codebook_term, commitment_term = self.beta * codebook, commitment
            else:
                codebook_term, commitment_term = codebook, self.beta * commitment
        entropy_term = (
            self.entropy_loss_ratio * entropy_regulariser(distances, self.entropy_temperature) if want_entropy else zero
        )
        loss = codebook_term + commitment_term + entropy_term

        straight = flat + (quantized - flat).detach()
        z_q = straight.view(n, h, w, self.dim).permute(0, 3, 1, 2).contiguous().to(z.dtype)

        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        if self.training:
            counts = self._all_reduce_(counts)
            self._update_usage(counts)
            if self.ema:
                self._ema_update(flat.detach(), indices, counts)
            if self.restart_dead_codes:
                self._restart_dead_codes(flat.detach(), counts)

        info = {
            "indices": indices.view(n, h, w),
            "perplexity": perplexity_from_counts(counts),
            "usage": self.usage(),
            "batch_usage": (counts > 0).float().mean(),
            "codebook": codebook_term.detach(),
            "commitment": commitment_term.detach(),
            "entropy": entropy_term.detach(),
        }
        return z_q, loss, info

    # -- statistics -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update_usage(self, counts: torch.Tensor) -> None:
        self.batches_seen += 1
        self.code_last_used.masked_fill_(counts > 0, self.batches_seen)

    def usage(self) -> torch.Tensor:
        """Fraction of codes used in the last ``usage_window`` training batches (0 before the first one)."""
        oldest = (self.batches_seen - self.usage_window).clamp_min(0)
        return (self.code_last_used > oldest).float().mean()

    # -- EMA codebook ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros(self.codebook_size, self.dim, device=flat.device, dtype=flat.dtype)
        sums = self._all_reduce_(sums.index_add_(0, indices, flat))
        g = self.ema_decay
        self.ema_cluster_size.mul_(g).add_(counts.to(self.ema_cluster_size), alpha=1 - g)
        self.ema_embed_sum.mul_(g).add_(sums.to(self.ema_embed_sum), alpha=1 - g)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_eps) / (total + self.codebook_size * self.ema_eps) * total
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    # -- dead codes ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        if self.ema:
            code_usage = self.ema_cluster_size
        else:
            code_usage = self.dead_code_usage
            code_usage.mul_(self.ema_decay).add_(counts.to(code_usage), alpha=1 - self.ema_decay)
        dead = self._broadcast_((code_usage < self.dead_code_threshold).to(torch.uint8)).bool()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        replacement = self._broadcast_(self._sample_rows(flat, n_dead).to(self.embedding.weight))
        self.embedding.weight[dead] = replacement
        code_usage[dead] = 1.0
        if self.ema:
            self.ema_embed_sum[dead] = replacement

    @staticmethod
    def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
        """n random rows of x, distinct where x has enough rows (torch's global RNG on x's device)."""
        if x.shape[0] >= n:
            return x[torch.randperm(x.shape[0], device=x.device)[:n]]
        return x[torch.randint(x.shape[0], (n,), device=x.device)]

    # -- k-means ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_seeds(self, x: torch.Tensor) -> torch.Tensor:
        """k-means++ seeds (K, D) from the rows of x: each next seed drawn with probability ∝ squared distance."""
        seeds = torch.empty(self.codebook_size, self.dim, device=x.device, dtype=x.dtype)
        x2 = x.pow(2).sum(1)

        def to_seed(seed: torch.Tensor) -> torch.Tensor:  # squared distances of all rows to one seed (a matvec)
            return (x2 - 2 * (x @ seed) + seed.pow(2).sum()).clamp_min(0)

        seeds[0] = x[torch.randint(x.shape[0], (1,), device=x.device)]
        with _ieee_matmul(x.device):
            nearest = to_seed(seeds[0])
            for k in range(1, self.codebook_size):
                weights = torch.where(nearest.sum() > 0, nearest, torch.ones_like(nearest))  # all covered: uniform
                seeds[k] = x[torch.multinomial(weights, 1)]
                nearest = torch.minimum(nearest, to_seed(seeds[k]))
        return seeds

    @torch.no_grad()
    def _kmeans_initialise(self, flat: torch.Tensor) -> None:
        centroids = self._broadcast_(self._kmeans_seeds(flat))  # rank 0's seeds on every rank
        for _ in range(self.kmeans_iters):
            assign = self._distances(flat, centroids).argmin(1)
            counts = self._all_reduce_(torch.bincount(assign, minlength=self.codebook_size).to(flat.dtype))
            sums = torch.zeros_like(centroids).index_add_(0, assign, flat)
            sums = self._all_reduce_(sums)
            means = sums / counts.clamp_min(1)[:, None]
            if self.l2_normalize:
                means = F.normalize(means, dim=-1)
            centroids = torch.where(counts[:, None] > 0, means, centroids)  # empty clusters keep their seed
        self.embedding.weight.copy_(centroids)
        self._reset_stats(centroids)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _reset_stats(self, weight: torch.Tensor) -> None:
        """EMA / dead-code statistics back to their initial state for the codebook ``weight``."""
        if self.ema:
            self.ema_cluster_size.fill_(1.0)
            self.ema_embed_sum.copy_(weight)
        elif self.restart_dead_codes:
            self.dead_code_usage.fill_(1.0)

    # -- loading taming / diffusers state dicts ----------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        absent = {name for name in STAT_BUFFERS if prefix + name in missing_keys}
        if not absent or prefix + "embedding.weight" not in state_dict:
            return
        # A codebook without statistics (taming's, diffusers'): start them afresh from the loaded codes (the
        # ``embedding`` child loads after this module, so read its weight from the state dict).
        for name in absent:
            missing_keys.remove(prefix + name)
        with torch.no_grad():
            if absent & {"ema_cluster_size", "ema_embed_sum", "dead_code_usage"}:
                self._reset_stats(state_dict[prefix + "embedding.weight"])
            if "initialized" in absent:
                self.initialized.fill_(True)
            if "code_last_used" in absent or "batches_seen" in absent:
                self.code_last_used.zero_()
                self.batches_seen.zero_()

    def extra_repr(self) -> str:
        opts = [f"{self.codebook_size}, {self.dim}", f"beta={self.beta}", f"legacy={self.legacy}"]
        for name in ("ema", "l2_normalize", "kmeans_init", "restart_dead_codes"):
            if getattr(self, name):
                opts.append(f"{name}=True")
        if self.entropy_loss_ratio > 0:
            opts.append(f"entropy_loss_ratio={self.entropy_loss_ratio}")
        return ", ".join(opts)
