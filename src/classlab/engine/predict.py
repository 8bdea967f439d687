"""The one eval-mode loop: a model's outputs over a whole loader, outside Lightning, on one process.

The final test of a training run, ``classlab eval``, test-time augmentation and multi-task
prediction all come through :func:`eval_loop`, so the numbers in summary.json and the ones
``eval`` prints are computed the same way: eval mode, no gradients, float32 outputs on the CPU,
the model's own mode restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from classlab.config import Config
from classlab.data.rotation import rotate_batch

Outputs = torch.Tensor | Sequence[torch.Tensor]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no gradients inside; the model's mode restored after. Yields the model's device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def autocast(cfg: Config, device: torch.device) -> Any:
    """The run's inference precision: bf16 autocast for a bf16 run (its weights were trained to work
    in bf16, and it is the fast path), else full precision."""
    if cfg.trainer.precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eval_loop(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    step: Callable[[torch.Tensor], Outputs] | None = None,
    *,
    rotation: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(each output of ``step`` concatenated over all batches, the labels).

    ``step`` maps a batch on the model's device to one tensor or a tuple of tensors (default:
    the model's logits); ``rotation`` turns each batch into its four rotations first (the
    rotation pretext's labels).
    """
    step = step or model
    columns: list[list[torch.Tensor]] = []
    labels: list[torch.Tensor] = []
    with evaluating(model) as device:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            if rotation:
                x, y = rotate_batch(x)
            out = step(x)
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            if not columns:
                columns = [[] for _ in outs]
            for column, tensor in zip(columns, outs):
                column.append(tensor.float().cpu())
            labels.append(y.cpu())
    if not labels:
        return [], torch.empty(0, dtype=torch.long)
    return [torch.cat(c) for c in columns], torch.cat(labels)


def predict_logits(model: nn.Module, loader: Iterable, *, rotation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every batch of ``loader``."""
    outs, labels = eval_loop(model, loader, rotation=rotation)
    return (outs[0] if outs else torch.empty(0, 0)), labels


def predict_tasks(model: nn.Module, loader: Iterable) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Multi-task runs: (each task's logits, combined logits, combined labels); ``model`` is a ClassifierModel."""

    def step(x: torch.Tensor) -> list[torch.Tensor]:
        task_logits, combined = model.net.forward_tasks(model.normalize(x))
        return [*task_logits, combined]

    outs, labels = eval_loop(model, loader, step)
    if not outs:
        return [], torch.empty(0, 0), labels
    return outs[:-1], outs[-1], labels


def predict_split(
    model: nn.Module, loader: Iterable, multitask: bool, *, rotation: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(each task's logits, logits, labels) of a loader: the tasks' list is empty for a single-label model."""
    if multitask:
        return predict_tasks(model, loader)
    logits, labels = predict_logits(model, loader, rotation=rotation)
    return [], logits, labels


def task_probabilities(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-task runs: (combined probabilities, each task's probabilities) of one uint8 batch."""
    with evaluating(model) as device:
        task_logits, combined = model.net.forward_tasks(model.normalize(batch.to(device)))
    return combined.float().softmax(1).cpu(), [t.float().softmax(1).cpu() for t in task_logits]


def probabilities(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Softmax of one uint8 batch."""
    with evaluating(model) as device:
        return model(batch.to(device)).float().softmax(1).cpu()
