"""A NaN or infinite loss stops the run at that step, or (``trainer.on_nonfinite: skip_batch``) skips the batch.

Without a check a diverged run keeps training on garbage and ends ``finished``; worse, its
last.ckpt is overwritten with NaN weights. The check sits between backward and the optimizer
step (Lightning's ``on_before_optimizer_step``), so a bad batch never reaches the weights:
``stop`` raises there, before the step and before any checkpoint of this epoch is written;
``skip_batch`` drops the batch's gradients (``set_to_none``: torch optimizers then leave every
parameter, its momentum and its weight decay alone).

The decision is reduced across processes, so under DDP every process stops or skips together.
BatchNorm running statistics have already seen the batch's forward pass; a batch whose inputs
make the forward pass itself non-finite can still leave them damaged, which only ``stop`` avoids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
from rich.console import Console

from classlab.engine.optim import head_lr
from classlab.errors import ClassLabError
from classlab.run import RunFolder


class Diverged(ClassLabError):
    """Training stopped on a non-finite loss; the run's summary says ``diverged``."""

    run_status = "diverged"


class NonFiniteGuard(L.Callback):
    """Stops (``stop``) or skips (``skip_batch``) a training step whose loss is NaN or infinite."""

    def __init__(
        self,
        mode: Literal["stop", "skip_batch"],
        run: RunFolder | None = None,
        console: Console | None = None,
        saved_epochs: Callable[[], int] | None = None,
    ) -> None:
        self.mode = mode
        self.run = run
        self.console = console
        self.saved_epochs = saved_epochs  # the epochs last.ckpt holds (RunRecorder writes it on an interval)
        self.skipped = 0  # over the whole run, carried across --resume in the checkpoint
        self._epoch_skipped = 0  # in epoch _count_epoch; a checkpoint cut mid-epoch carries both
        self._count_epoch = -1
        self._loss: torch.Tensor | None = None
        self._batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "epoch": self._count_epoch, "epoch_skipped": self._epoch_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self._count_epoch = int(state.get("epoch", -1))
        self._epoch_skipped = int(state.get("epoch_skipped", 0))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed in the middle of an epoch goes on counting that epoch's skipped batches.
        if self._count_epoch != trainer.current_epoch:
            self._count_epoch, self._epoch_skipped = trainer.current_epoch, 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch_idx
        self._loss = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._loss is None:
            return
        bad = not bool(torch.isfinite(self._loss).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        if self.mode == "stop":
            raise Diverged(self._message(trainer, optimizer))
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self._epoch_skipped += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_skipped and self.console is not None:
            self.console.print(
                f"epoch {trainer.current_epoch + 1}: skipped {self._epoch_skipped} of {trainer.num_training_batches} "
                f"batches with a non-finite loss (trainer.on_nonfinite=skip_batch)"
            )
        self._epoch_skipped = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.mode == "skip_batch" and self.run is not None and trainer.is_global_zero:
            self.run.update_summary(nonfinite_batches_skipped=self.skipped)

    def _message(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> str:
        value = float(self._loss.float().flatten()[0]) if self._loss is not None else math.nan
        kind = "NaN" if math.isnan(value) else "infinite"
        lr = head_lr(optimizer)
        done = trainer.current_epoch
        saved = self.saved_epochs() if self.saved_epochs is not None else done
        if saved == done and done:
            kept = f"checkpoints/last.ckpt keeps epoch {done}, the last good one"
        elif saved:
            kept = f"checkpoints/last.ckpt keeps epoch {saved} (written every trainer.checkpoint_every_s), a good one"
        else:
            kept = "no checkpoint had been written yet"
        return (
            f"the loss became {kind} at epoch {done + 1}, step {trainer.global_step + 1} "
            f"(batch {self._batch + 1} of {trainer.num_training_batches}) with learning rate {lr:.4g}: "
            f"training stopped and {kept}; lower optim.lr, set trainer.clip_grad, "
            f"or set trainer.on_nonfinite=skip_batch to skip such batches"
        )
