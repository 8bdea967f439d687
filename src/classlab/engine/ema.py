"""An exponential moving average of the weights, as a Lightning callback.

The averaged weights usually generalize better than the last ones (Polyak averaging), so they
are what a run is judged and shipped with: validation and test swap them in, and the
checkpoint's ``"state_dict"`` holds them, so ``eval``/``predict`` (which read only that key) use
the EMA model without knowing about EMA. Training still has to continue from the raw weights,
so each checkpoint also carries them under ``"raw_state_dict"`` (plus the update counters in
the callback state); resuming puts the raw weights back into the model and the average back
into the callback, and the run continues bit-for-bit as if it had not stopped.

A checkpoint written with ``save_weights_only=True`` skips callback hooks, so it holds the raw
weights only: keep EMA runs' checkpoints full.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["EMACallback"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class EMACallback(pl.Callback):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every ``every_n_steps`` optimizer steps.

    Parameters are averaged; buffers (BatchNorm running statistics, counters) are copied,
    because the running statistics must describe the activations of the weights they sit with,
    and averaging an integer counter means nothing. The average of a float16/bfloat16 parameter
    is kept in float32: a (1 - decay) = 1e-4 nudge is below bfloat16's resolution.

    ``warmup`` (default on) uses ``min(decay, (1 + n) / (10 + n))`` for the n-th update, as
    TensorFlow's and timm's EMAs do: early on the average follows the model closely instead of
    remembering the random initialization for thousands of steps, which matters for the short
    runs this toolkit is often used for.
    """

    RAW_KEY = "raw_state_dict"

    def __init__(self, decay: float, every_n_steps: int = 1, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self._last_step = -1
        self._ema: dict[str, Tensor] | None = None
        self._backup: dict[str, Tensor] | None = None
        self._live: dict[str, Tensor] = {}
        self._param_keys: set[str] = set()

    # -- the average -----------------------------------------------------------------------

    @property
    def ema_state_dict(self) -> dict[str, Tensor] | None:
        """The averaged state (keys of ``pl_module.state_dict()``), or None before training."""
        return self._ema

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    def _sync(self, pl_module: pl.LightningModule) -> None:
        """Refresh references to the live tensors, and follow the model across devices.

        Device moves and ``channels_last`` conversion replace buffer tensors, so references
        taken once at construction would go stale; the average is created or moved here, after
        the strategy has placed the model.
        """
        self._live = pl_module.state_dict(keep_vars=True)
        self._param_keys = {name for name, _ in pl_module.named_parameters(remove_duplicate=False)}
        if self._ema is None:
            self._ema = {}
        for key, live in self._live.items():
            ema = self._ema.get(key)
            if ema is None:
                ema = live.detach().clone()
                if ema.dtype in _LOW_PRECISION:
                    ema = ema.float()
                self._ema[key] = ema
            elif ema.device != live.device:
                self._ema[key] = ema.to(live.device)

    @torch.no_grad()
    def _update(self) -> None:
        assert self._ema is not None
        weight = 1.0 - self.current_decay()
        same_ema, same_live = [], []
        for key, live in self._live.items():
            ema = self._ema[key]
            if key not in self._param_keys or not live.is_floating_point():
                ema.copy_(live)
            elif ema.dtype == live.dtype:
                same_ema.append(ema)
                same_live.append(live.detach())
            else:
                ema.lerp_(live.detach().to(ema.dtype), weight)
        if same_ema:
            torch._foreach_lerp_(same_ema, same_live, weight)
        self.num_updates += 1

    # -- swapping the average in for evaluation --------------------------------------------

    @torch.no_grad()
    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self._ema is None or self._backup is not None:
            return
        self._sync(pl_module)
        self._backup = {}
        for key, live in self._live.items():
            self._backup[key] = live.detach().clone()
            live.copy_(self._ema[key])

    @torch.no_grad()
    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        for key, live in pl_module.state_dict(keep_vars=True).items():
            live.copy_(self._backup[key])
        self._backup = None

    # -- Lightning hooks -------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync(pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # gradient accumulation: no optimizer step on this batch
            return
        self._last_step = step
        if step % self.every_n_steps == 0:
            if self._ema is None:
                self._sync(pl_module)
            self._update()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An interrupted validation must not leave the average in place of the training weights.
        self._swap_out(pl_module)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"num_updates": self.num_updates, "last_step": self._last_step, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._last_step = int(state_dict.get("last_step", -1))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._ema is None:
            return
        model_state = checkpoint["state_dict"]
        # Saved during validation the model holds the average; the raw weights are the backup.
        raw = self._backup if self._backup is not None else model_state
        checkpoint[self.RAW_KEY] = {key: raw.get(key, value) for key, value in model_state.items()}
        checkpoint["state_dict"] = {key: self._ema.get(key, value) for key, value in model_state.items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        raw = checkpoint.get(self.RAW_KEY)
        if raw is None:
            # A checkpoint of a run without EMA: the average starts from the loaded weights.
            self._ema = None
            return
        self._ema = {key: value.detach().clone() for key, value in checkpoint["state_dict"].items()}
        self._backup = None
        pl_module.load_state_dict(raw, strict=pl_module.strict_loading)
