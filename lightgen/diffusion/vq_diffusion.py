"""VQ-Diffusion's token process: the discrete mask-and-replace diffusion of Gu et al. (2022).

Follows the official code (microsoft/VQ-Diffusion), ``image_synthesis/modeling/transformers/
diffusion_transformer.py``: ``alpha_schedule`` for the transition tables, ``q_pred``,
``q_pred_one_timestep``, ``q_posterior`` and ``predict_start`` for the maths (log space, float32 tables
computed in float64, clamped at -70), ``_train_loss`` with ``vb_stochastic`` and ``sample_time``
(importance sampling) for training, ``sample`` / ``sample_fast`` / ``p_sample`` for sampling, and
``models/conditional_dalle.py`` / ``dalle.py`` for classifier-free guidance and truncation.

**Layout.** K code classes plus the MASK class as the last index K; log-probabilities have shape
(N, K + 1, L), class dimension 1 (the official layout). Time is the official index t in [0, T): the
state visited at t is x_t and one step yields x_{t-1}; x_{-1} is the data (``q_pred(., -1)`` is the
identity through the sentinel entry T of the cumulative tables). All per-time quantities are gathered
per sample, so every function takes a batch of mixed t.

**The net protocol** (the process imports no net class): attributes ``codebook_size`` (K),
``num_tokens`` (L), ``mask_token_id`` (= K), ``null_class`` (None or the unconditional label) and
optionally ``num_timesteps`` (must be T); ``net(tokens, t, y=labels)`` with ``tokens`` a LongTensor
(N, L) in [0, K] and ``t`` a LongTensor (N,) in [0, T) returns logits (N, K, L). The process takes the
log-softmax in float64 (official ``predict_start``), appends a -70 row for MASK and clamps.

**Sampling settings** (``lightgen.sampling``): ``steps`` (network evaluations; T = every t; T/Δ = the
official fast inference with stride Δ, ``sample_fast``), ``truncation`` (official ``top{r}r``; 1 = off),
``posterior`` (``official`` | ``exact``), ``purity_weight`` (``sampler=purity`` only) and guidance
(``cfg_scale`` etc.) on log p(x0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightgen.diffusion.guidance import LOG_EPS, Guider
from lightgen.diffusion.process import Process, flat_codes
from lightgen.utils.progress import progress_bar
from lightgen.utils.rng import draw

NET_ATTRIBUTES = ("codebook_size", "mask_token_id", "num_tokens", "null_class")
POSTERIORS = ("official", "exact")
SAMPLERS = ("ancestral", "purity")
LOG_ZERO = math.log(1.0e-30)  # the official log of a one-hot's zeros


# -- log-space helpers (official names) ---------------------------------------------------------
def log_add_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) as the official code (max-shifted)."""
    maximum = torch.max(a, b)
    return maximum + torch.log(torch.exp(a - maximum) + torch.exp(b - maximum))


def log_1_min_a(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) with the official 1e-40 guard."""
    return torch.log(1 - a.exp() + 1e-40)


def index_to_log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Log one-hot (N, C, ...) of indices (N, ...): 0 at the index, log(1e-30) elsewhere (official)."""
    if x.numel() and int(x.max()) >= num_classes:
        raise ValueError(
            f"an index {int(x.max())} is not a class of {num_classes}; indices must lie in [0, {num_classes})."
        )
    onehot = F.one_hot(x.long(), num_classes)
    onehot = onehot.permute(0, -1, *range(1, x.ndim))
    return torch.log(onehot.float().clamp(min=1e-30))


def log_categorical(log_x_start: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Σ_c p(c) log q(c) over dim 1 (the official decoder log-likelihood)."""
    return (log_x_start.exp() * log_prob).sum(dim=1)


def multinomial_kl(log_prob1: torch.Tensor, log_prob2: torch.Tensor) -> torch.Tensor:
    """KL(p1 ‖ p2) over dim 1 of log-probabilities."""
    return (log_prob1.exp() * (log_prob1 - log_prob2)).sum(dim=1)


def _extract(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """``table[t]`` per sample, shaped (N, 1, ...) to broadcast over (N, C, L)."""
    return table.gather(-1, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def gumbel_argmax(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A categorical sample over dim 1 by the official Gumbel-argmax (noise from ``generator``, on its device)."""
    u = draw("rand", log_probs.shape, generator, log_probs.device)
    gumbel = -torch.log(-torch.log(u + 1e-30) + 1e-30)
    return (gumbel + log_probs).argmax(dim=1)


def truncate(log_probs: torch.Tensor, r: float) -> torch.Tensor:
    """The official ``top{r}r`` truncation of p(x0) over dim 1 (``predict_start_with_truncation``).

    Classes sorted by probability are kept while the cumulative probability *before* them is < r (so the
    top-1 and the class crossing r are kept); the others are set to -70, without renormalising.
    """
    sorted_lp, order = torch.sort(log_probs, dim=1, descending=True)
    below = sorted_lp.exp().cumsum(dim=1) < r
    keep_sorted = torch.cat([torch.ones_like(below[:, :1]), below[:, :-1]], dim=1)
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)  # back to class order (no 2nd sort)
    return torch.where(keep, log_probs, torch.full_like(log_probs, LOG_EPS))


# -- the schedule ---------------------------------------------------------------------------------
class DiscreteSchedule:
    """VQ-Diffusion's transition schedule (official ``alpha_schedule``).

    ᾱ_t (keep) and γ̄_t (mask) are linear in t from their start (t = 0) to their end (t = T − 1) values;
    per step α_t = ᾱ_t / ᾱ_{t−1}, 1 − γ_t = (1 − γ̄_t) / (1 − γ̄_{t−1}) (ᾱ_{−1} = 1, γ̄_{−1} = 0), and the
    uniform replace probabilities follow from α + Kβ + γ = 1, so they depend on the number of code
    classes K: :meth:`tables` takes it. The official defaults (``alpha_init_type='alpha1'``) are
    practically an absorbing (mask-only) process with a linear mask rate.

    Args:
        num_timesteps: T (official 100).
        alpha_bar_start, alpha_bar_end: ᾱ at t = 0 and t = T − 1 (official 0.99999, 0.000009).
        gamma_bar_start, gamma_bar_end: γ̄ at t = 0 and t = T − 1 (official 0.000009, 0.99999).
        name: the config's name, for messages.
        kind: always ``"discrete"`` (the ``schedule`` group's marker).
    """

    kind = "discrete"

    def __init__(
        self,
        num_timesteps: int = 100,
        alpha_bar_start: float = 0.99999,
        alpha_bar_end: float = 0.000009,
        gamma_bar_start: float = 0.000009,
        gamma_bar_end: float = 0.99999,
        kind: str = "discrete",
        name: str = "discrete",
    ):
        self.name = str(name)
        if kind != "discrete":
            raise ValueError(
                f"DiscreteSchedule is a schedule of kind 'discrete', not {kind!r}; use kind: discrete in its config."
            )
        if isinstance(num_timesteps, bool) or int(num_timesteps) != num_timesteps or int(num_timesteps) < 2:
            raise ValueError(f"num_timesteps={num_timesteps!r} must be an integer >= 2 (official: 100).")
        a0, a1, c0, c1 = (float(v) for v in (alpha_bar_start, alpha_bar_end, gamma_bar_start, gamma_bar_end))
        if not (0.0 < a1 <= a0 <= 1.0 and 0.0 <= c0 <= c1 < 1.0 and a0 + c0 <= 1.0 and a1 + c1 <= 1.0):
            raise ValueError(
                f"the discrete schedule needs 0 < alpha_bar_end <= alpha_bar_start <= 1, 0 <= gamma_bar_start <= "
                f"gamma_bar_end < 1 and alpha_bar + gamma_bar <= 1 at both ends, but got alpha_bar {a0:g} -> {a1:g}, "
                f"gamma_bar {c0:g} -> {c1:g} (official: 0.99999 -> 0.000009, 0.000009 -> 0.99999)."
            )
        self.num_timesteps = int(num_timesteps)
        self.alpha_bar_start, self.alpha_bar_end = a0, a1
        self.gamma_bar_start, self.gamma_bar_end = c0, c1

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(T={self.num_timesteps}, alpha_bar {self.alpha_bar_start:g}->{self.alpha_bar_end:g}, "
            f"gamma_bar {self.gamma_bar_start:g}->{self.gamma_bar_end:g})"
        )

    def tables(self, num_codes: int) -> dict[str, np.ndarray]:
        """float64 tables for K = ``num_codes``, as the official ``alpha_schedule(T, N=K, ...)`` returns them.

        ``at, bt, ct`` (T,): one step t−1 → t; ``att, btt, ctt`` (T + 1,): cumulative 0 → t, with the
        sentinel ᾱ = 1, β̄ = γ̄ = 0 at index T (so t = −1 reads the identity).
        """
        T = self.num_timesteps
        att = np.arange(0, T) / (T - 1) * (self.alpha_bar_end - self.alpha_bar_start) + self.alpha_bar_start
        att = np.concatenate(([1], att))
        at = att[1:] / att[:-1]
        ctt = np.arange(0, T) / (T - 1) * (self.gamma_bar_end - self.gamma_bar_start) + self.gamma_bar_start
        ctt = np.concatenate(([0], ctt))
        one_minus_ctt = 1 - ctt
        ct = 1 - one_minus_ctt[1:] / one_minus_ctt[:-1]
        bt = (1 - at - ct) / num_codes
        att = np.concatenate((att[1:], [1]))
        ctt = np.concatenate((ctt[1:], [0]))
        btt = (1 - att - ctt) / num_codes
        if (bt < 0).any() or (btt < 0).any() or (ct < 0).any():
            raise ValueError(
                f"{self!r} gives negative transition probabilities for K={num_codes} codes; keep alpha_bar "
                f"non-increasing, gamma_bar non-decreasing and alpha_bar + gamma_bar <= 1."
            )
        return {"at": at, "bt": bt, "ct": ct, "att": att, "btt": btt, "ctt": ctt}


class _Tables:
    """The process's log tables for one K on one device (float32 from float64, as the official buffers)."""

    def __init__(self, schedule: DiscreteSchedule, num_codes: int, device):
        tab = {k: torch.tensor(v, dtype=torch.float64) for k, v in schedule.tables(num_codes).items()}
        self.num_codes = num_codes
        log = {k: torch.log(v) for k, v in tab.items()}
        f32 = {
            "log_at": log["at"],
            "log_bt": log["bt"],
            "log_ct": log["ct"],
            "log_cumprod_at": log["att"],
            "log_cumprod_bt": log["btt"],
            "log_cumprod_ct": log["ctt"],
            "log_1_min_ct": log_1_min_a(log["ct"]),
            "log_1_min_cumprod_ct": log_1_min_a(log["ctt"]),
        }
        for k, v in f32.items():
            setattr(self, k, v.float().to(device))
        # float64 cumulative tables for the multi-step transitions of the exact posterior
        self.att64 = tab["att"].to(device)
        self.ctt64 = tab["ctt"].to(device)


# -- the process ----------------------------------------------------------------------------------
class VQDiffusionProcess(Process, nn.Module):
    """VQ-Diffusion: discrete diffusion on code maps with an x0-parameterised posterior.

    Training (:meth:`training_losses`): the official ``_train_loss`` (``vb_stochastic``): t from the
    importance sampler, x_t ~ q(x_t | x_0) (Gumbel-argmax, global RNG), KL(q(x_{t−1}|x_t, x_0) ‖
    p_θ(x_{t−1}|x_t)) × ``mask_weight`` summed over positions (the decoder NLL at t = 0), plus
    ``aux_weight`` × ((1 − t/T) + 1 if ``adaptive_aux``) × the x0 loss KL(x_0 ‖ p_θ(x̃0|x_t)), both divided
    by p_t; summed and divided by N·L. The loss history of the importance sampler is kept in buffers
    (``Lt_history``, ``Lt_count``), saved in checkpoints with the LightningModule (this process is an
    ``nn.Module``), updated identically on every rank (all-gathered under ``torch.distributed``).

    Sampling (:meth:`sample`): from all-MASK, ``ancestral`` (official ``sample`` / ``sample_fast``) or
    ``purity`` (Improved VQ-Diffusion's purity prior, official ``prior_rule = 2``).

    Args:
        schedule: a :class:`DiscreteSchedule`.
        aux_weight: λ of the auxiliary x0 loss (official ``auxiliary_loss_weight``; 5e-4, ImageNet 1e-3).
        adaptive_aux: weight the auxiliary loss by (1 − t/T) + 1 (official ``adaptive_auxiliary_loss``).
        mask_weight: the loss weights on [masked, unmasked] positions of x_t (official [1, 1]).
        importance_sampling: sample t by the loss history (official ``'importance'``) or uniformly.
    """

    samplers = SAMPLERS
    guidance_on = "log_probs"
    schedule_kind = "discrete"
    data_kind = "tokens"
    sampling_keys = ("sampler", "steps", "truncation", "posterior", "purity_weight")

    def __init__(
        self,
        schedule: DiscreteSchedule,
        aux_weight: float = 5.0e-4,
        adaptive_aux: bool = True,
        mask_weight: Sequence[float] = (1.0, 1.0),
        importance_sampling: bool = True,
    ):
        nn.Module.__init__(self)
        if getattr(schedule, "kind", None) != self.schedule_kind:
            raise ValueError(
                f"VQDiffusionProcess needs a discrete schedule, but got {schedule!r}; select one with "
                f"schedule=vqd_alpha1 (official) or schedule=vqd_mask_replace."
            )
        if not float(aux_weight) >= 0:
            raise ValueError(f"aux_weight={aux_weight!r} must be >= 0 (official: 5e-4, ImageNet 1e-3).")
        mw = [float(w) for w in mask_weight]
        if len(mw) != 2 or min(mw) < 0:
            raise ValueError(
                f"mask_weight={list(mask_weight)!r} must be two non-negative weights [masked, unmasked] "
                f"(official [1, 1])."
            )
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.aux_weight = float(aux_weight)
        self.adaptive_aux = bool(adaptive_aux)
        self.mask_weight = tuple(mw)
        self.importance_sampling = bool(importance_sampling)
        self.register_buffer("Lt_history", torch.zeros(self.num_timesteps))
        self.register_buffer("Lt_count", torch.zeros(self.num_timesteps, dtype=torch.long))
        self._tables: dict = {}

    def extra_repr(self) -> str:
        return (
            f"{self.schedule!r}, aux_weight={self.aux_weight:g}, adaptive_aux={self.adaptive_aux}, "
            f"mask_weight={list(self.mask_weight)}, importance_sampling={self.importance_sampling}"
        )

    def tables(self, num_codes: int, device) -> _Tables:
        """The log tables for K = ``num_codes`` on ``device`` (computed once, when the process meets the net)."""
        key = (int(num_codes), str(torch.device(device)))
        if key not in self._tables:
            self._tables[key] = _Tables(self.schedule, int(num_codes), torch.device(device))
        return self._tables[key]

    # -- the net ----------------------------------------------------------------------------------
    def prepare_net(self, net) -> None:
        missing = [a for a in NET_ATTRIBUTES if not hasattr(net, a)]
        if missing:
            raise ValueError(
                f"VQDiffusionProcess needs a token net with {', '.join(NET_ATTRIBUTES)}, but {type(net).__name__} "
                f"lacks {', '.join(missing)}; use a VQ-Diffusion model."
            )
        if int(net.mask_token_id) != int(net.codebook_size):
            raise ValueError(
                f"VQ-Diffusion's MASK is the last class, mask_token_id = codebook_size = {int(net.codebook_size)}, "
                f"but {type(net).__name__} has mask_token_id={net.mask_token_id}; build the net with the mask last."
            )
        t_net = getattr(net, "num_timesteps", None)
        if t_net is not None and int(t_net) != self.num_timesteps:
            raise ValueError(
                f"the net embeds {int(t_net)} timesteps but the schedule has num_timesteps={self.num_timesteps}; "
                f"set model.num_timesteps={self.num_timesteps} (or schedule.num_timesteps={int(t_net)})."
            )
        self.tables(int(net.codebook_size), "cpu")  # checks the schedule for this K now

    def log_probs_k(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """log p_θ(x̃0 | x_t) over the K codes (N, K, L): float64 log-softmax, float32, clamped at −70."""
        out = net(x_t, t, **cond)
        k, n, length = int(net.codebook_size), x_t.shape[0], x_t.shape[1]
        if out.ndim != 3 or tuple(out.shape) != (n, k, length):
            raise ValueError(
                f"a VQ-Diffusion net must return logits of shape ({n}, {k}, {length}) (N, codebook_size, num_tokens), "
                f"but {type(net).__name__} returned {tuple(out.shape)}."
            )
        return F.log_softmax(out.double(), dim=1).float().clamp(LOG_EPS, 0.0)

    @staticmethod
    def with_mask_row(log_probs_k: torch.Tensor) -> torch.Tensor:
        """(N, K, L) → (N, K + 1, L) with the MASK row at −70, clamped (official ``predict_start``)."""
        mask_row = torch.full_like(log_probs_k[:, :1], LOG_EPS)
        return torch.cat([log_probs_k, mask_row], dim=1).clamp(LOG_EPS, 0.0)

    def predict_start(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """log p_θ(x̃0 | x_t) (N, K + 1, L), the MASK row at −70 (official ``predict_start``)."""
        return self.with_mask_row(self.log_probs_k(net, x_t, t, cond))

    # -- the forward process ----------------------------------------------------------------------
    def _tab(self, log_x: torch.Tensor) -> _Tables:
        return self.tables(log_x.shape[1] - 1, log_x.device)

    def q_pred(self, log_x_start: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log q(x_t | x_0) for a (log) distribution of x_0 (N, K + 1, L); t = −1 is the identity."""
        tab = self._tab(log_x_start)
        t = (t + (self.num_timesteps + 1)) % (self.num_timesteps + 1)
        nd = log_x_start.ndim
        a, b = _extract(tab.log_cumprod_at, t, nd), _extract(tab.log_cumprod_bt, t, nd)
        c, one_min_c = _extract(tab.log_cumprod_ct, t, nd), _extract(tab.log_1_min_cumprod_ct, t, nd)
        return torch.cat(
            [log_add_exp(log_x_start[:, :-1] + a, b), log_add_exp(log_x_start[:, -1:] + one_min_c, c)], dim=1
        )

    def _step_logs(self, log_x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None):
        """log (α, β, γ, 1 − γ) of the transition s → t per sample (s = t − 1 by default: the official tables)."""
        tab, nd = self._tab(log_x), log_x.ndim
        if s is None:
            return tuple(_extract(x, t, nd) for x in (tab.log_at, tab.log_bt, tab.log_ct, tab.log_1_min_ct))
        m = self.num_timesteps + 1
        s = (s + m) % m
        att_t, att_s = _extract(tab.att64, t, nd), _extract(tab.att64, s, nd)
        ctt_t, ctt_s = _extract(tab.ctt64, t, nd), _extract(tab.ctt64, s, nd)
        a = att_t / att_s
        c = 1 - (1 - ctt_t) / (1 - ctt_s)
        b = (1 - a - c) / tab.num_codes
        log_c = torch.log(c)
        return tuple(x.float() for x in (torch.log(a), torch.log(b), log_c, log_1_min_a(log_c)))

    def q_pred_one_timestep(
        self, log_x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log q(x_t | x_{t−1}) as a function of x_{t−1}, for x_t given (log one-hot); s → t with ``t_prev``."""
        a, b, c, one_min_c = self._step_logs(log_x_t, t, t_prev)
        return torch.cat([log_add_exp(log_x_t[:, :-1] + a, b), log_add_exp(log_x_t[:, -1:] + one_min_c, c)], dim=1)

    def q_sample(
        self, log_x_start: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (indices (N, L)) by Gumbel-argmax, from ``generator`` or the global RNG."""
        return gumbel_argmax(self.q_pred(log_x_start, t), generator)

    def q_posterior(
        self, log_x_start: torch.Tensor, log_x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log Σ_{x0} q(x_{t−1} | x_t, x0) p(x0): the official ``DiffusionTransformer.q_posterior``.

        ``log_x_start`` (N, K + 1, L) is p(x0) (one-hot or predicted), ``log_x_t`` the log one-hot of x_t,
        ``t`` per sample in [0, T) (t − 1 = −1 gives p over x0 itself). With ``t_prev`` = s < t the same
        formula with the s → t transition: the exact multi-step posterior q(x_s | x_t, x0). Clamped to [−70, 0].
        """
        k = log_x_start.shape[1] - 1
        n, spatial = log_x_start.shape[0], log_x_t.shape[2:]
        mask = (log_x_t.argmax(dim=1) == k).unsqueeze(1)
        log_one = torch.zeros(n, 1, *([1] * len(spatial)), dtype=log_x_t.dtype, device=log_x_t.device)
        log_zero = torch.log(log_one + 1.0e-30).expand(-1, -1, *spatial)
        tab = self._tab(log_x_start)

        # q(x_t | x0) as a function of x0 (the normaliser)
        log_qt = self.q_pred(log_x_t, t)[:, :-1]
        ct_cum = _extract(tab.log_cumprod_ct, t, log_x_start.ndim).expand(-1, k, *([-1] * len(spatial)))
        log_qt = torch.where(mask, ct_cum, log_qt)

        # q(x_t | x_{t-1}) (or x_s) as a function of x_{t-1}
        log_step = self.q_pred_one_timestep(log_x_t, t, t_prev)
        log_step = torch.cat([log_step[:, :-1], log_zero], dim=1)
        log_c = self._step_logs(log_x_t, t, t_prev)[2]
        c_vector = torch.cat([log_c.expand(-1, k, *([-1] * len(spatial))), log_one], dim=1)
        log_step = torch.where(mask, c_vector, log_step)

        q = torch.cat([log_x_start[:, :-1] - log_qt, log_zero], dim=1)
        q_log_sum_exp = torch.logsumexp(q, dim=1, keepdim=True)
        q = q - q_log_sum_exp
        prev = t - 1 if t_prev is None else t_prev
        out = self.q_pred(q, prev) + log_step + q_log_sum_exp
        return out.clamp(LOG_EPS, 0.0)

    # -- training ---------------------------------------------------------------------------------
    def sample_time(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, p_t) per sample from the global RNG: uniform until every t has been seen more than 10 times,
        then ∝ sqrt(Lt_history + 1e-10) + 1e-4 with the decoder term set to L1's (official ``sample_time``)."""
        if self.importance_sampling and bool((self.Lt_count > 10).all()):
            lt_sqrt = torch.sqrt(self.Lt_history.float() + 1e-10) + 0.0001
            lt_sqrt[0] = lt_sqrt[1]
            pt_all = lt_sqrt / lt_sqrt.sum()
            t = torch.multinomial(pt_all, num_samples=n, replacement=True)
            return t.to(device), pt_all.gather(0, t).to(device)
        t = torch.randint(0, self.num_timesteps, (n,), device=device).long()
        return t, torch.ones_like(t).float() / self.num_timesteps

    @staticmethod
    def _gather_ranks(t: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, values) of every rank, in rank order, when torch.distributed runs with more than one process."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return t, values
        world = dist.get_world_size()
        size = torch.tensor([t.shape[0]], device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        most = int(max(int(s) for s in sizes))
        packed = torch.zeros(most, 2, dtype=torch.float64, device=t.device)
        packed[: t.shape[0], 0] = t.double()
        packed[: t.shape[0], 1] = values.double()
        parts = [torch.zeros_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed)
        rows = torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])
        return rows[:, 0].long(), rows[:, 1]

    @torch.no_grad()
    def update_history(self, t: torch.Tensor, lt2: torch.Tensor) -> None:
        """Lt_history[t] ← 0.1 Lt² + 0.9 Lt_history[t], Lt_count[t] += 1 (official), over all ranks' samples.

        A t drawn twice takes its last sample's value (the official ``scatter_`` on CPU), so the update
        is deterministic and identical on every rank.
        """
        t, lt2 = self._gather_ranks(t.detach(), lt2.detach())
        hist, count = self.Lt_history, self.Lt_count
        t, lt2 = t.to(hist.device), lt2.to(hist.device)
        order = torch.arange(t.shape[0], device=t.device)
        last = torch.full((self.num_timesteps,), -1, dtype=torch.long, device=t.device)
        last = last.scatter_reduce(0, t, order, reduce="amax")
        seen = last >= 0
        new = 0.1 * lt2[last[seen]].to(hist.dtype) + 0.9 * hist[seen]
        hist[seen] = new
        count += torch.bincount(t, minlength=self.num_timesteps).to(count.dtype)

    def losses_at(self, net, codes: torch.Tensor, t: torch.Tensor, pt: torch.Tensor, cond: dict) -> dict:
        """Per-sample terms of the official ``_train_loss`` at given t (sums over positions, not normalised)."""
        k = int(net.codebook_size)
        log_x_start = index_to_log_onehot(codes, k + 1)
        log_xt = index_to_log_onehot(self.q_sample(log_x_start, t), k + 1)
        xt = log_xt.argmax(dim=1)
        log_x0_recon = self.predict_start(net, xt, t, cond)
        log_model_prob = self.q_posterior(log_x0_recon, log_xt, t)
        log_true_prob = self.q_posterior(log_x_start, log_xt, t)

        mask_region = (xt == k).float()
        weight = mask_region * self.mask_weight[0] + (1.0 - mask_region) * self.mask_weight[1]
        kl = (multinomial_kl(log_true_prob, log_model_prob) * weight).flatten(1).sum(1)
        decoder_nll = -log_categorical(log_x_start, log_model_prob).flatten(1).sum(1)
        at_zero = (t == 0).float()
        kl_loss = at_zero * decoder_nll + (1.0 - at_zero) * kl
        vb = kl_loss / pt
        aux = torch.zeros_like(vb)
        if self.aux_weight != 0:
            kl_aux = (multinomial_kl(log_x_start[:, :-1], log_x0_recon[:, :-1]) * weight).flatten(1).sum(1)
            kl_aux_loss = at_zero * decoder_nll + (1.0 - at_zero) * kl_aux
            w = self.aux_factor(t) if self.adaptive_aux else 1.0
            aux = w * self.aux_weight * kl_aux_loss / pt
        with torch.no_grad():
            hits = ((log_x0_recon.argmax(dim=1) == codes).float() * mask_region).sum()
        return {
            "kl_loss": kl_loss,
            "vb": vb,
            "aux": aux,
            "hits": hits,
            "masked": mask_region.sum(),
        }

    def aux_factor(self, t: torch.Tensor) -> torch.Tensor:
        """The adaptive auxiliary weight (1 − t/T) + 1: 2 at t = 0, 1 + 1/T at t = T − 1."""
        return (1 - t / self.num_timesteps) + 1.0

    def training_losses(self, net, x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = flat_codes(x0, net, "VQ-Diffusion")
        n, length = codes.shape
        t, pt = self.sample_time(n, codes.device)
        out = self.losses_at(net, codes, t, pt, cond)
        if self.importance_sampling:
            self.update_history(t, out["kl_loss"].pow(2))
        norm = n * length
        loss = (out["vb"] + out["aux"]).sum() / norm
        with torch.no_grad():
            terms = {
                "loss": loss.detach(),
                "vb": out["vb"].sum() / norm,
                "aux": out["aux"].sum() / norm,
                "kl": out["kl_loss"].sum() / norm,  # unweighted by 1/p_t
                "acc": out["hits"] / out["masked"].clamp(min=1),  # x0 argmax accuracy on masked positions
                "mask_ratio": out["masked"] / norm,
            }
        return loss, terms

    # -- sampling ---------------------------------------------------------------------------------
    def check_sampling(
        self,
        sampler: str,
        steps: int,
        truncation: float = 1.0,
        posterior: str = "official",
        purity_weight: float = 0.0,
    ) -> None:
        T = self.num_timesteps
        if sampler not in self.samplers:
            raise ValueError(f"sampler={sampler!r} is not a VQ-Diffusion sampler; use ancestral or purity.")
        if isinstance(steps, bool) or int(steps) != steps or not 1 <= int(steps) <= T or T % int(steps):
            raise ValueError(
                f"steps={steps!r} must divide num_timesteps={T} (the stride T/steps of the official fast "
                f"inference), e.g. {T} (every step) or {T // 2 if T % 2 == 0 else T}."
            )
        if sampler == "purity" and int(steps) != T:
            raise ValueError(
                f"sampler=purity visits every timestep (official sample), so steps must be {T}, not {steps}."
            )
        if not 0.0 < float(truncation) <= 1.0:
            raise ValueError(f"truncation={truncation!r} must lie in (0, 1] (1 = off; the official README uses 0.86).")
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior={posterior!r} is not understood; use official (default) or exact.")
        if not float(purity_weight) >= 0.0:
            raise ValueError(
                f"purity_weight={purity_weight!r} must be >= 0 (official prior_weight: 0; README purity: 1)."
            )

    def visits(self, steps: int) -> list[int]:
        """The t's the official ``sample_fast`` visits with stride Δ = T / steps: T−1, T−1−Δ, …, then 0."""
        stride = self.num_timesteps // int(steps)
        ts = list(range(self.num_timesteps - 1, -1, -stride))
        if ts[-1] != 0:
            ts.append(0)
        return ts

    def purity_budget(self, num_tokens: int) -> list[int]:
        """Tokens revealed at each t (index t) by the purity sampler (official ``n_sample``, ``prior_ps`` > 10).

        The official lists (T = 100, 50, 25, 10) are for L = 1024 tokens; for another L the cumulative
        budget is scaled by L / 1024 (rounded); for another T the reveal is spread evenly over t = T−1 … 1.
        Whatever is left at t = 0 is sampled there from the posterior.
        """
        T = self.num_timesteps
        official = {
            100: [1, 10] + [11, 10, 10] * 32 + [11, 11],
            50: [10] + [21, 20] * 24 + [30],
            25: [21] + [41] * 23 + [60],
            10: [69] + [102] * 8 + [139],
        }
        if T in official:
            per_t, total = official[T], 1024
        else:
            per_t, total = [0] + [1] * (T - 1), T - 1
        budget, before, cum = [0] * T, 0, 0
        for t in range(T - 1, 0, -1):
            cum += per_t[t]
            target = min(num_tokens, int(math.floor(num_tokens * min(cum, total) / total + 0.5)))
            budget[t] = target - before
            before = target
        budget[0] = max(num_tokens - before, 0)  # informative: t = 0 draws every position from the posterior
        return budget

    def predict_for_sampling(
        self, net, x: torch.Tensor, t: torch.Tensor, cond: dict, guider: Guider, truncation: float
    ):
        """log p̃(x̃0 | x_t) (N, K + 1, L): guided on log-probs (renormalised, clamped), then truncated.

        As the official ``conditional_dalle.cf_predict_start`` wrapped by ``predict_start_with_truncation``:
        truncation acts on the guided distribution.
        """

        def forward(xx, tt, **cc):
            return self.log_probs_k(net, xx, tt, cc)

        if guider.enabled:
            log_k = guider.guided_forward(forward, net, x, t, cond)
        else:
            log_k = forward(x, t, **cond)
        log_x0 = self.with_mask_row(log_k)
        if float(truncation) < 1.0:
            log_x0 = truncate(log_x0, float(truncation))
        return log_x0

    @torch.no_grad()
    def sample(
        self,
        net,
        shape,
        cond: dict,
        guider: Guider,
        generator: torch.Generator | None = None,
        sampler: str = "ancestral",
        steps: int = 100,
        truncation: float = 1.0,
        posterior: str = "official",
        purity_weight: float = 0.0,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Codes (N, h, w) for ``shape`` (N, h, w) or (N, L), from all-MASK; all randomness from ``generator``.

        ``ancestral``: at each visited t (:meth:`visits`), x̃0 ~ p̃(x̃0|x_t) (guided, truncated) is pushed
        through the posterior and x is drawn by Gumbel-argmax. ``posterior="official"``:
        ``q_posterior(x̃0, x_t, t − (Δ − 1))`` for t > Δ − 1, else ``q_posterior(x̃0, x_t, t)`` (official
        ``sample_fast``; Δ = 1 is the official ``sample``); ``"exact"``: q(x_s | x_t, x̃0) with s the next
        visited t (−1 after the last), the same at Δ = 1.

        ``purity`` (official ``p_sample`` with ``prior_rule = 2``, one call per t): at t > 0 every position
        draws x̃0 from p̃ (sharpened by ``purity_weight`` r as ((1 + r·score) log p̃).softmax), and
        :meth:`purity_budget` masked positions, drawn without replacement ∝ purity = max_c p̃ / its max
        over positions, take their draws; at t = 0 all positions are drawn from the posterior.
        """
        self.check_sampling(sampler, steps, truncation, posterior, purity_weight)
        device = torch.device(device) if device is not None else next(iter(cond.values())).device
        k, length = int(net.codebook_size), int(net.num_tokens)
        n = int(shape[0])
        grid = tuple(shape[1:]) if len(shape) > 2 else (length,)
        if math.prod(grid) != length:
            raise ValueError(
                f"cannot sample shape {tuple(shape)} with a net of num_tokens={length}; match the first stage's "
                f"token grid to the model."
            )
        x = torch.full((n, length), k, dtype=torch.long, device=device)
        visits = self.visits(steps) if sampler == "ancestral" else list(range(self.num_timesteps - 1, -1, -1))
        skip = self.num_timesteps // int(steps) - 1
        budget = self.purity_budget(length) if sampler == "purity" else None
        with progress_bar(progress) as bar:
            task = bar.add_task("VQ-Diffusion sampling", total=len(visits))
            for i, tv in enumerate(visits):
                t = torch.full((n,), tv, dtype=torch.long, device=device)
                log_x0 = self.predict_for_sampling(net, x, t, cond, guider, truncation)
                log_xt = index_to_log_onehot(x, k + 1)
                if sampler == "purity" and tv > 0:
                    x = self._purity_step(x, log_x0, k, budget[tv], float(purity_weight), generator)
                else:
                    if posterior == "exact" and skip > 0:
                        s = visits[i + 1] if i + 1 < len(visits) else -1
                        prob = self.q_posterior(log_x0, log_xt, t, torch.full_like(t, s))
                    else:
                        prob = self.q_posterior(log_x0, log_xt, t - skip if tv > skip else t)
                    x = gumbel_argmax(prob, generator)
                bar.advance(task)
        return x.view(n, *grid)

    @staticmethod
    def _purity_step(x, log_x0, k: int, n_reveal: int, weight: float, generator) -> torch.Tensor:
        score = log_x0.exp().max(dim=1).values.clamp(0, 1)
        score = score / (score.max(dim=1, keepdim=True).values + 1e-10)
        if weight > 0:
            prob = ((1 + score * weight).unsqueeze(1) * log_x0).softmax(dim=1).log().clamp(LOG_EPS, 0.0)
        else:
            prob = log_x0
        drawn = gumbel_argmax(prob, generator)
        masked = x == k
        w = score.clone()
        if w.sum() < 1e-6:
            w = w + 1
        w = torch.where(masked, w, torch.zeros_like(w))
        # n_reveal positions per row without replacement, ∝ w (Gumbel top-k = sequential multinomial draws)
        u = draw("rand", w.shape, generator, x.device)
        keys = torch.log(w) - torch.log(-torch.log(u + 1e-30) + 1e-30)
        keys = torch.where(w > 0, keys, torch.full_like(keys, -math.inf))
        ranks = keys.argsort(dim=1, descending=True).argsort(dim=1)
        take = torch.minimum(masked.sum(dim=1, keepdim=True), torch.full_like(ranks[:, :1], n_reveal))
        selected = (ranks < take) & masked
        return torch.where(selected, drawn, x)
