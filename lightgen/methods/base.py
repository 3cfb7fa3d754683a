"""What every lightgen method shares: EMA, optimiser, first stage, logging, checkpoint extras."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightgen.methods.ema import make_ema, update_ema
from lightgen.utils.grads import grad_norm
from lightgen.utils.rng import get_rng_state, seed_all, set_rng_state

CHECKPOINT_KEY = "lightgen"
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FORMAT_VERSION = 1


def fused_on_cuda(factory, params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` for Adam / AdamW on CUDA parameters when the config sets neither ``fused`` nor ``foreach``.

    The fused kernel updates every parameter in one launch instead of torch's default multi-tensor (foreach) path:
    the same update up to float rounding. Anywhere else (the CPU, other optimisers, an explicit choice) ``{}``.
    """
    keywords = getattr(factory, "keywords", None) or {}
    cls = getattr(factory, "func", factory)
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    is_adam = isinstance(cls, type) and issubclass(cls, (torch.optim.Adam, torch.optim.AdamW))
    return {"fused": True} if on_cuda and is_adam and not {"fused", "foreach"} & set(keywords) else {}


class RunState:
    """Per-rank RNG streams and the lightgen extras every checkpoint carries (mixed into LightningModules).

    Needs ``self.seed``, ``self.config`` and ``self.net``; ``checkpoint_extras()`` adds method-specific
    entries. A fresh run seeds rank ``r`` of ``W`` with ``seed * W + r``; a resumed one restores every
    rank's saved RNG state at the start of training, so it continues the uninterrupted trajectory.
    """

    _resume_rng: list | None = None
    _resume_world_size: int | None = None

    def checkpoint_extras(self) -> dict[str, Any]:
        return {}

    # -- RNG and checkpoints ----------------------------------------------------------------
    def on_train_start(self) -> None:
        rank, world = self.global_rank, self.trainer.world_size
        if self._resume_rng is not None and self._resume_world_size == world:
            set_rng_state(self._resume_rng[rank])
        else:
            if self._resume_rng is not None:
                warnings.warn(
                    f"resuming with {world} processes from a checkpoint written by {self._resume_world_size}: "
                    "the noise stream is re-seeded, so the run will not be bit-identical to an uninterrupted one.",
                    stacklevel=1,
                )
            seed_all(self.seed * world + rank + 1_000_003 * self.global_step)
        self._resume_rng = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = get_rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint[CHECKPOINT_KEY] = {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "rng_states": states,
            "net_class": f"{type(self.net).__module__}.{type(self.net).__qualname__}",
            **self.checkpoint_extras(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY, {})
        states = extra.get("rng_states")
        if states:
            self._resume_rng = states
            self._resume_world_size = len(states)


class LightgenModule(RunState, pl.LightningModule):
    """What every lightgen LightningModule shares: the optimiser(s) from a factory, rank-averaged logging.

    Needs ``self.net``, ``self.optimizer_factory`` (``functools.partial`` of a torch optimiser) and
    ``self.scheduler_factory`` (None or a partial taking the optimiser, stepped every training step).

    ``step_skipped`` / ``nonfinite_streak`` are set by :class:`lightgen.callbacks.NonFiniteGuard`: whether the
    current optimiser step was skipped for a non-finite loss or gradient, and how many were in a row.
    """

    step_skipped: bool = False
    nonfinite_streak: int = 0

    def optimized_parameter_groups(self) -> list[list[nn.Parameter]]:
        """One list of parameters per optimiser (default: the trainable parameters of ``self.net``)."""
        return [[p for p in self.net.parameters() if p.requires_grad]]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("this module was built without an optimizer (sampling only); select optim=... to train.")
        optimizers = [
            self.optimizer_factory(params=group, **fused_on_cuda(self.optimizer_factory, group))
            for group in self.optimized_parameter_groups()
        ]
        if self.scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        schedulers = [{"scheduler": self.scheduler_factory(o), "interval": "step"} for o in optimizers]
        if len(optimizers) == 1:
            return {"optimizer": optimizers[0], "lr_scheduler": schedulers[0]}
        return optimizers, schedulers

    def log_mean_across_ranks(
        self, values: dict[str, torch.Tensor], batch_size: int, prog_bar=("train/loss",)
    ) -> dict[str, torch.Tensor]:
        """Average scalars over all ranks with one collective; log the ``train/*`` ones; return all, averaged."""
        names = list(values)
        stacked = torch.stack([values[k].detach().float() for k in names])
        if self._trainer is not None:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="mean")
        out = dict(zip(names, stacked))
        for k, v in out.items():
            if k.startswith("train/"):
                self.log(k, v, on_step=True, on_epoch=False, prog_bar=k in prog_bar, batch_size=batch_size)
        return out


class GenerativeModule(LightgenModule):
    """Base LightningModule of the generative methods: a net with its EMA copy, a first stage, an optimiser.

    Args:
        net: the network (``cfg.model``), a plain ``nn.Module``.
        first_stage: encoder/decoder between images and the space the net works in.
        optimizer: ``functools.partial`` of a torch optimiser (``cfg.optim.optimizer``); None to sample only.
        scheduler: optional partial taking the optimiser (stepped every training step).
        ema_decay: EMA decay (DiT: 0.9999).
        ema_every: update the EMA after every ``ema_every``-th optimiser step (1: every step, as DiT,
            MDT, DiffiT and MaskGIT; official VQ-Diffusion: decay 0.99 every 25 steps).
        seed: global seed; rank ``r`` of ``W`` draws noise from ``seed * W + r``.
        compile: ``torch.compile`` the net and its EMA copy (training and sampling) with ``compile_mode`` /
            ``compile_backend``; in place (``nn.Module.compile``), so state-dict keys, checkpoints, EMA updates
            and the official-weights loaders are unchanged. The first steps are slow while it compiles.
        config: the resolved run config, stored in every checkpoint so ``lightgen.sample``
            can rebuild the run (set by the builder after construction).
    """

    def __init__(
        self,
        net: nn.Module,
        first_stage: nn.Module,
        optimizer=None,
        scheduler=None,
        ema_decay: float = 0.9999,
        ema_every: int = 1,
        seed: int = 0,
        config: dict | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
    ):
        super().__init__()
        if not isinstance(compile, bool):
            raise ValueError(f"method.compile={compile!r} must be true or false.")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"method.compile_mode={compile_mode!r} is not a torch.compile mode; use one of "
                f"{', '.join(str(m) for m in COMPILE_MODES)}."
            )
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"method.ema_decay={ema_decay} must be in [0, 1); DiT uses 0.9999.")
        if isinstance(ema_every, bool) or not isinstance(ema_every, int) or ema_every < 1:
            raise ValueError(
                f"method.ema_every={ema_every!r} must be a whole number of optimiser steps >= 1 (1: every step; "
                "official VQ-Diffusion: 25)."
            )
        self.net = net
        self.ema = make_ema(net)
        self.first_stage = first_stage
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.ema_decay = ema_decay
        self.ema_every = ema_every
        self.seed = seed
        self.config = config
        self.compile_options = dict(mode=compile_mode, backend=compile_backend) if compile else None
        self._compiled = False

    def setup(self, stage: str) -> None:
        if self.compile_options is not None and not self._compiled:
            if self.compile_options["backend"] == "inductor":  # random ops in the net (DiT's label dropout) draw
                import torch._inductor.config  # from torch's RNG as in eager mode: same stream, exact resume

                torch._inductor.config.fallback_random = True
            self.net.compile(**self.compile_options)
            self.ema.compile(**self.compile_options)
            self._compiled = True

    # -- data -----------------------------------------------------------------------------
    def batch_latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pre-extracted latents are used as they are; images go through the first stage."""
        if "latent" in batch:
            return batch["latent"]
        with torch.no_grad():
            return self.first_stage.encode(batch["image"])

    # -- optimisation ---------------------------------------------------------------------
    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # global_step counts the optimiser steps before this one, so this is step global_step + 1
        if not self.step_skipped and (self.global_step + 1) % self.ema_every == 0:
            update_ema(self.ema, self.net, self.ema_decay)

    def on_before_optimizer_step(self, optimizer) -> None:
        # the non-finite guard (a callback, called first) has computed this step's norm already
        step, norm = getattr(self, "step_grad_norm", (None, None))
        if step != self.global_step or self.step_skipped:
            norm = grad_norm(self.net.parameters())
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False, sync_dist=False)
