"""Losses for skewed labels: per-class weights and the focal loss.

A competition's classes are rarely balanced (utkface's race column: 5,265 white vs 405
black). Two remedies live here and one in ``data.sampler``:

- ``loss.class_weights: balanced`` weighs class c by n / (k * n_c) on the training split (the
  formula scikit-learn calls "balanced"), so every class contributes the same total weight to
  an epoch's loss; ``{class: weight}`` sets weights by hand (unlisted classes keep 1.0).
- ``loss.name: focal`` multiplies each image's cross-entropy by (1 - p_true)^gamma (Lin et al.
  2017), which turns the loss away from images the model already gets right; gamma 0 is plain
  cross-entropy.

Weights are computed once from the training labels (never the validation fold) and travel
with the LightningModule as a buffer, so checkpoints and resumed runs keep them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.sources import class_name
from classlab.errors import ConfigError


def balanced_weights(labels: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """n / (k * n_c) for each class c: classes of any size carry the same total weight.

    A class without training images gets weight 0 (it cannot be learned, and 1/0 would poison
    the loss); k counts only the classes present, so the weights still average to 1 per image.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = int((counts > 0).sum())
    weights = torch.zeros(num_classes, dtype=torch.float64)
    mask = counts > 0
    weights[mask] = len(labels) / (present * counts[mask])
    return weights.float()


def class_weight_tensor(
    spec: Any, labels: torch.Tensor | Sequence[int], classes: Sequence[str], where: str = "loss.class_weights"
) -> torch.Tensor | None:
    """``balanced`` | ``{class: weight}`` | None -> a (num_classes,) weight tensor (or None: unweighted)."""
    if spec is None:
        return None
    if spec == "balanced":
        return balanced_weights(labels, len(classes))
    if isinstance(spec, Mapping):
        given = {class_name(str(c)): value for c, value in spec.items()}
        unknown = [c for c in given if c not in classes]
        if unknown:
            raise ConfigError(f"{where}: unknown class(es) {', '.join(unknown)}; the classes are: {', '.join(classes)}")
        weights = torch.ones(len(classes))
        for name, value in given.items():
            weights[list(classes).index(name)] = float(value)
        return weights
    raise ConfigError(f"{where} = {spec!r}: use 'balanced' or a mapping {{class: weight}}")


def task_weight_specs(spec: Any, task_names: Sequence[str]) -> dict[str, Any]:
    """Multitask: one weight spec per task ('balanced' applies to every task; a map is keyed by task)."""
    if spec is None or spec == "balanced":
        return dict.fromkeys(task_names, spec)
    if isinstance(spec, Mapping):
        unknown = [str(k) for k in spec if k not in task_names]
        if unknown:
            raise ConfigError(
                f"loss.class_weights under task=multitask is 'balanced' or {{task: balanced | {{class: weight}}}}; "
                f"unknown task(s) {', '.join(unknown)} (tasks: {', '.join(task_names)})"
            )
        return {name: spec.get(name) for name in task_names}
    raise ConfigError(f"loss.class_weights = {spec!r}: use 'balanced' or a mapping")


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean over the batch of w_y * (1 - p_y)^gamma * CE (the CE with label smoothing when asked).

    With class weights the mean is weighted as cross-entropy's is (divided by the sum of the
    weights), so gamma 0 gives exactly ``F.cross_entropy(..., weight=w)``.
    """
    ce = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=label_smoothing)
    p_true = logits.float().softmax(1).gather(1, target[:, None]).squeeze(1)
    loss = (1.0 - p_true).clamp_min(0.0).pow(gamma) * ce if gamma else ce
    if weight is None:
        return loss.mean()
    w = weight.to(loss.device)[target]
    return (w * loss).sum() / w.sum().clamp_min(1e-12)


class Criterion(nn.Module):
    """The training loss of one label column: cross-entropy or focal, with optional class weights."""

    def __init__(
        self, name: str = "crossentropy", gamma: float = 2.0, weight: torch.Tensor | None = None, smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.name, self.gamma, self.smoothing = name, float(gamma), float(smoothing)
        self.register_buffer("weight", weight if weight is not None else torch.empty(0), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, smoothing: float | None = None) -> torch.Tensor:
        smooth = self.smoothing if smoothing is None else smoothing
        weight = self.weight if self.weight.numel() else None
        if self.name == "focal":
            return focal_loss(logits, target, self.gamma, weight, smooth)
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=smooth)


def build_criterion(loss_cfg: Any, weight: torch.Tensor | None = None) -> Criterion:
    """The loss the config's ``loss:`` section describes, with the class weights already resolved."""
    return Criterion(loss_cfg.name, loss_cfg.focal_gamma, weight, loss_cfg.label_smoothing)
