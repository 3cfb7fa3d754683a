"""Skip optimiser steps whose loss or gradients are not finite; stop after too many in a row."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from lightgen.utils.grads import grad_norm


class NonFiniteTraining(RuntimeError):
    """The loss or the gradient norm stayed non-finite for ``max_consecutive`` optimiser steps."""


class NonFiniteGuard(pl.Callback):
    """Guard every optimiser step against a non-finite loss or gradient norm (``callbacks.nonfinite``).

    Before each optimiser step the norm of the gradients it is about to apply is computed; when it, or the
    loss of any micro-batch on any rank, is NaN or infinite, the gradients are dropped (set to ``None``), so
    the optimiser changes neither the weights nor its moments, and the EMA is not updated. The learning-rate
    schedule and the step counter move on, as with PyTorch's ``GradScaler``. Each skip is counted and logged
    (``train/nonfinite_skips``: the total so far, every step; kept in checkpoints); no checkpoint is written while the
    current step was skipped, so ``last.ckpt`` always holds finite weights. After ``max_consecutive`` skipped
    steps in a row the run stops with :class:`NonFiniteTraining` (one sentence from ``lightgen.train``).

    Under DDP the gradients are already averaged over ranks, so every rank takes the same decision; the
    per-rank loss flags are combined with one scalar all-reduce. ``callbacks.nonfinite=null`` turns the
    guard off.
    """

    def __init__(self, max_consecutive: int = 10):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(
                f"callbacks.nonfinite.max_consecutive={max_consecutive!r} must be a whole number >= 1 "
                "(or callbacks.nonfinite=null to turn the guard off)."
            )
        self.max_consecutive = max_consecutive
        self.total = 0
        self._loss_finite = True

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._loss_finite = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = grad_norm(params)
        pl_module.step_grad_norm = (trainer.global_step, norm)  # logged by the module without a second pass
        norm = torch.zeros(()) if norm is None else norm
        bad = torch.tensor([0.0 if self._loss_finite else 1.0], device=norm.device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad.to(trainer.strategy.root_device), reduce_op="max")
        self._loss_finite = True
        bad_loss, norm_value = torch.stack([bad.reshape(()).to(norm), norm.float()]).tolist()  # one host sync
        skipped = bad_loss > 0 or not math.isfinite(norm_value)
        pl_module.step_skipped = skipped
        if skipped:
            for p in params:
                p.grad = None
            self.total += 1
        pl_module.log("train/nonfinite_skips", float(self.total), on_step=True, on_epoch=False, sync_dist=False)
        if not skipped:
            pl_module.nonfinite_streak = 0
            return
        pl_module.nonfinite_streak = getattr(pl_module, "nonfinite_streak", 0) + 1
        if pl_module.nonfinite_streak >= self.max_consecutive:
            step = trainer.global_step + 1  # the step being taken, as checkpoints count them
            raise NonFiniteTraining(
                f"the loss or gradient norm was not finite for {pl_module.nonfinite_streak} optimiser steps in a "
                f"row (steps {step - pl_module.nonfinite_streak + 1}-{step}), so the run stopped with its last "
                "checkpoint untouched; lower the learning rate (optim.optimizer.lr), check the data, or raise "
                "callbacks.nonfinite.max_consecutive"
            )

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total = int(state_dict.get("total", 0))
