"""MaskGIT's token process: masked-token training and parallel (confidence-ordered) decoding.

Follows the official code (google-research/maskgit): ``libml/mask_schedule.py`` for γ,
``libml/losses.py:weighted_sequence_cross_entropy_loss`` for the loss and
``libml/parallel_decode.py:decode`` for sampling, with torch random numbers drawn as diffusers'
``AmusedScheduler.step`` draws them (so a seeded generator gives the scheduler's tokens exactly).

**The net protocol** (the process imports no net class): attributes ``codebook_size`` (K),
``mask_token_id``, ``num_tokens`` (h·w) and ``null_class`` (None or the label of the unconditional
class); ``net(tokens, t, y=labels)`` with ``tokens`` a LongTensor (N, h·w) of codes in [0, K) or the mask
id returns logits (N, h·w, V) with V ≥ K + 1. The process always keeps ``logits[..., :K]``, so the mask
(and any class) id is never predicted nor sampled.

**Time.** MaskGIT's transformer has no time input (the mask tokens tell the step), so ``t`` is passed
only because the protocol calls ``net(x, t, **cond)``. It is a continuous time in [0, 1] with 1 = all
masked (``num_timesteps = 1``): training passes ``1 - r`` for the drawn ratio r, decoding step i of T
passes ``t_i = (T - 1 - i) / (T - 1)`` (``t_0 = 1`` … ``t_{T-1} = 0``; diffusers' AmusedScheduler
timesteps ``T-1 … 0`` divided by T − 1; ``t = 0`` for T = 1). That ``t_i`` is the guidance time: the
Guider's ``linear`` schedule, ``scale(t) = 1 + (scale - 1)(1 - t / num_timesteps)``, then gives
``1 + w i / (T - 1)``, valeoai's ramp ``logits = u + (1 + w i/(T-1)) (c - u)`` with ``cfg_scale = 1 + w``
(cfg_scale 1 = w 0 = no guidance; T = 1, where valeoai divides by zero, gets the full 1 + w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightgen.diffusion.guidance import Guider
from lightgen.diffusion.mask_schedules import MaskSchedule
from lightgen.diffusion.process import Process, flat_codes
from lightgen.utils.progress import progress_bar
from lightgen.utils.rng import generator_device

NET_ATTRIBUTES = ("codebook_size", "mask_token_id", "num_tokens", "null_class")
LOSS_ON = ("masked", "all")


class MaskGITProcess(Process):
    """MaskGIT: train on randomly masked code maps, sample by parallel decoding.

    Training (:meth:`training_losses`): per sample r ~ U[0, 1) from the global torch RNG, exactly
    ⌈γ(r) L⌉ of the L positions masked, chosen uniformly; cross-entropy over the K codes with the
    official label smoothing (on-value 1 − ε + ε/K, off-value ε/K), on the masked positions only
    (``loss_on="masked"``, the official ``compute_loss_for_all=False``) or on all of them
    (``loss_on="all"``: official ``compute_loss_for_all=True``, valeoai's choice). As the official
    ``weighted_sequence_cross_entropy_loss``, the loss is averaged per sequence over its weighted
    positions, then over the batch. Terms: ``loss``, ``acc`` (argmax accuracy on masked tokens) and
    ``mask_ratio`` (mean fraction masked).

    Sampling (:meth:`sample`): the official ``parallel_decode.decode`` (see its docstring).

    Args:
        schedule: the mask schedule γ (:class:`~lightgen.diffusion.mask_schedules.MaskSchedule`).
        label_smoothing: ε (official 0.1).
        loss_on: ``masked`` (official default) | ``all``.
    """

    samplers = ("maskgit",)
    guidance_on = "logits"
    schedule_kind = "mask"
    sampling_keys = ("sampler", "steps", "choice_temperature")
    num_timesteps = 1  # the time axis is continuous, t in [0, 1] (see the module docstring)
    data_kind = "tokens"

    def __init__(self, schedule: MaskSchedule, label_smoothing: float = 0.1, loss_on: str = "masked"):
        if getattr(schedule, "kind", None) != self.schedule_kind:
            raise ValueError(
                f"MaskGITProcess needs a mask schedule, but got {schedule!r}; select one with schedule=mask_cosine "
                f"(or mask_linear, mask_square, mask_cubic, mask_sqrt, mask_log, mask_exp)."
            )
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} must lie in [0, 1) (official: 0.1).")
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r} is not understood; use masked (official) or all.")
        self.schedule = schedule
        self.label_smoothing = float(label_smoothing)
        self.loss_on = loss_on

    # -- the net ----------------------------------------------------------------------------------
    def prepare_net(self, net) -> None:
        missing = [a for a in NET_ATTRIBUTES if not hasattr(net, a)]
        if missing:
            raise ValueError(
                f"MaskGITProcess needs a token net with {', '.join(NET_ATTRIBUTES)}, but {type(net).__name__} "
                f"lacks {', '.join(missing)}; use a MaskGIT model (e.g. model=maskgit_*)."
            )

    def _logits(self, out: torch.Tensor, net, n: int) -> torch.Tensor:
        """The code logits ``out[..., :K]`` of a net output (N, L, V), V ≥ K + 1 (one sentence if not)."""
        k, length = int(net.codebook_size), int(net.num_tokens)
        if out.ndim != 3 or tuple(out.shape[:2]) != (n, length) or out.shape[-1] < k + 1:
            raise ValueError(
                f"a MaskGIT net must return logits of shape ({n}, {length}, V) with V >= codebook_size + 1 = "
                f"{k + 1}, but {type(net).__name__} returned {tuple(out.shape)}."
            )
        return out[..., :k]

    # -- training ---------------------------------------------------------------------------------
    def num_masked(self, r: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """⌈γ(r) L⌉ per sample (float32 maths as the official code), at least 1 and at most L."""
        n = torch.ceil(self.schedule(r, num_tokens) * num_tokens)
        return n.long().clamp(1, num_tokens)

    def draw_mask(self, r: torch.Tensor, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A boolean mask (N, L) with exactly ``num_masked(r)`` True per row, at uniformly drawn positions."""
        scores = torch.rand(r.shape[0], num_tokens, device=r.device, generator=generator)
        ranks = scores.argsort(dim=1).argsort(dim=1)  # ranks, so ties cannot change the count
        return ranks < self.num_masked(r, num_tokens)[:, None]

    def smoothed_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (N, L) against one-hot targets smoothed to 1 − ε + ε/K and ε/K."""
        eps, k = self.label_smoothing, logits.shape[-1]
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        return (1.0 - eps) * nll - (eps / k) * logp.sum(dim=-1)

    def training_losses(self, net, x0: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        codes = flat_codes(x0, net, "MaskGIT")
        n, length = codes.shape
        r = torch.rand(n, device=codes.device)
        mask = self.draw_mask(r, length)
        tokens = torch.where(mask, torch.full_like(codes, int(net.mask_token_id)), codes)
        logits = self._logits(net(tokens, 1.0 - r, **cond), net, n)
        per_token = self.smoothed_cross_entropy(logits, codes)
        weights = mask.float() if self.loss_on == "masked" else torch.ones_like(per_token)
        # official weighted_sequence_cross_entropy_loss: mean over each sequence's weighted tokens, then batch
        loss = ((per_token * weights).sum(dim=1) / weights.sum(dim=1)).mean()
        with torch.no_grad():
            hits = (logits.argmax(dim=-1) == codes) & mask
            terms = {
                "loss": loss.detach(),
                "acc": hits.sum().float() / mask.sum().clamp(min=1).float(),
                "mask_ratio": mask.float().mean(),
            }
        return loss, terms

    # -- sampling ---------------------------------------------------------------------------------
    def check_sampling(self, sampler: str, steps: int, choice_temperature: float = 4.5) -> None:
        if sampler not in self.samplers:
            raise ValueError(f"sampler={sampler!r} is not a MaskGIT sampler; use maskgit.")
        if isinstance(steps, bool) or int(steps) < 1:
            raise ValueError(f"steps={steps!r} must be a positive number of decoding steps (MaskGIT: 8 or 12).")
        if not float(choice_temperature) >= 0:
            raise ValueError(f"choice_temperature={choice_temperature!r} must be >= 0 (official: 4.5).")

    @staticmethod
    def guidance_time(step: int, steps: int) -> float:
        """``t_i = (T - 1 - i) / (T - 1)`` (0 for T = 1): the Guider's linear schedule gives valeoai's ramp."""
        return (steps - 1 - step) / (steps - 1) if steps > 1 else 0.0

    def sample(
        self,
        net,
        shape,
        cond: dict,
        guider: Guider,
        generator: torch.Generator | None = None,
        sampler: str = "maskgit",
        steps: int = 8,
        choice_temperature: float = 4.5,
        progress: bool = False,
        device=None,
    ) -> torch.Tensor:
        """Codes (N, h, w) for ``shape`` (N, h, w) or (N, …) by the official parallel decoding.

        Start all masked, N0 = the masked count per sample; at step i of T: logits (guided through
        ``guider`` when enabled) cut to the K codes; every position sampled from softmax(logits)
        (``torch.multinomial``), known tokens kept; ratio = (i + 1)/T, mask_len = ⌊N0 γ(ratio)⌋ clamped
        to [1, #unknown − 1]; confidence = log p(sampled) + choice_temperature (1 − ratio) Gumbel, +inf
        for known tokens; tokens with confidence below the mask_len-th smallest are masked again. The
        last step re-masks nothing (the official output is that step's samples, before re-masking), and
        draws no Gumbel noise, as diffusers. All randomness comes from ``generator``, drawn on its device.
        """
        self.check_sampling(sampler, steps, choice_temperature)
        steps, temp = int(steps), float(choice_temperature)
        device = torch.device(device) if device is not None else next(iter(cond.values())).device
        k, mask_id, length = int(net.codebook_size), int(net.mask_token_id), int(net.num_tokens)
        n = int(shape[0])
        grid = tuple(shape[1:]) if len(shape) > 2 else (length,)
        if math.prod(grid) != length:
            raise ValueError(
                f"cannot sample shape {tuple(shape)} with a net of num_tokens={length}; match the first stage's "
                f"token grid to the model."
            )
        rng_device = generator_device(generator, device)
        x = torch.full((n, length), mask_id, dtype=torch.long, device=device)
        n0 = (x == mask_id).sum(dim=-1, keepdim=True)
        with progress_bar(progress) as bar:
            task = bar.add_task("MaskGIT decoding", total=steps)
            for i in range(steps):
                t = torch.full((n,), self.guidance_time(i, steps), dtype=torch.float64, device=device)
                if guider.enabled:
                    out = guider.guided_forward(net.forward, net, x, t, cond)
                else:
                    out = net(x, t, **cond)
                probs = self._logits(out, net, n).softmax(dim=-1)
                unknown = x == mask_id
                # categorical sample of every position, as AmusedScheduler.step (multinomial on the generator's device)
                p = probs.to(rng_device)
                if p.device.type == "cpu" and p.dtype != torch.float32:
                    p = p.float()  # multinomial has no CPU half kernel
                sampled = torch.multinomial(p.reshape(-1, k), 1, generator=generator).to(device).view(n, length)
                sampled = torch.where(unknown, sampled, x)
                if i == steps - 1:
                    x = sampled
                else:
                    ratio = (i + 1) / steps
                    mask_ratio = self.schedule(ratio, n0).to(device)
                    mask_len = torch.floor(n0 * mask_ratio)
                    mask_len = torch.maximum(
                        torch.ones_like(mask_len), torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len)
                    )
                    selected = probs.gather(-1, sampled[..., None])[..., 0]
                    selected = torch.where(unknown, selected, torch.full_like(selected, math.inf))
                    gumbel = self._gumbel(selected.shape, rng_device, generator).to(device)
                    confidence = torch.log(selected) + temp * (1.0 - ratio) * gumbel
                    cut_off = confidence.sort(dim=-1).values.gather(-1, mask_len.long())
                    x = torch.where(confidence < cut_off, torch.full_like(sampled, mask_id), sampled)
                bar.advance(task)
        return x.view(n, *grid)

    @staticmethod
    def _gumbel(shape, device, generator) -> torch.Tensor:
        """Standard Gumbel noise drawn as diffusers' ``gumbel_noise`` (uniform_ on the generator's device)."""
        u = torch.zeros(shape, device=device).uniform_(0, 1, generator=generator)
        return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))
