"""Multi-task networks (``task: multitask``): one backbone, one classifier per label column, one combined class.

Competition labels are often a product of independent questions (mask x gender x age group).
Learning each question with its own small head shares the backbone's features across all
images instead of splitting them over every combination, and a rare combination still gets
the gradients of its common parts.

How the pieces fit the single-label machinery:

- The data layer stores one *combined* label per image (``data.tasks``); ``TaskLayout.split``
  takes it apart again for the heads' losses.
- The network returns combined *logits*: the sum of the tasks' log-probabilities over the
  product grid, so ``softmax`` of it is exactly the product of the task probabilities and its
  argmax is the most probable combination. Everything that consumes (B, C) logits (validation
  top-1, best.ckpt, ``eval``, TTA, export) therefore works on the combined class unchanged.
- ``model.fusion: attention`` adds a head in which each task's hidden state attends to the
  others'; the mixed states give a correction to the product rule (initialised at zero, so
  training starts from the product rule and only learns dependence between tasks that the
  data supports).
- ``model.fusion: attention_only`` is the competition project's AttentionNet as drawn: the same
  attention over the task hidden states, and the combined prediction comes from the fused states
  alone (a linear layer on them, normally initialised); the task heads are trained beside it and
  give the per-task predictions, but the combined class no longer uses their product.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.tasks import TaskLayout
from classlab.errors import ConfigError
from classlab.models.net import ClassifierNet
from classlab.models.registry import build_model, check_param_budget


def joint_log_probs(task_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the tasks' log-probabilities over the product grid, flattened row-major: (B, prod C_t).

    Its softmax is the product of the task probabilities (the sum is already normalised), so
    the argmax is the combination the independent heads find most probable.
    """
    joint = F.log_softmax(task_logits[0].float(), dim=1)
    for logits in task_logits[1:]:
        lp = F.log_softmax(logits.float(), dim=1)
        joint = (joint[:, :, None] + lp[:, None, :]).flatten(1)
    return joint


# ---------------------------------------------------------------------------------------------


class AttentionFusion(nn.Module):
    """Self-attention across the task hidden states, then a correction over the combined classes.

    The output layer starts at zero, so the combined prediction starts as the product rule and
    the fusion only adds what the tasks' interplay is worth on the data.
    """

    def __init__(self, num_tasks: int, dim: int, num_combined: int, zero_init: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(num_tasks * dim, num_combined)
        if zero_init:  # a correction starts at nothing; a prediction of its own (attention_only) does not
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return self.out(self.norm(tokens + mixed).flatten(1))


def fusion_dim(num_features: int) -> int:
    """Width of a task's hidden state under fusion: the features' width, kept between 32 and 256."""
    return max(32, min(256, num_features))


class MultiTaskNet(nn.Module):
    """Backbone features -> one classifier per task (-> attention fusion) -> combined logits."""

    def __init__(self, backbone: nn.Module, layout: TaskLayout, fusion: str | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = list(layout.names)
        features = int(backbone.num_features)
        self.num_features = features
        self.fused = fusion in ("attention", "attention_only")
        self.fusion_only = fusion == "attention_only"
        if self.fused:
            dim = fusion_dim(features)
            # Each task first gets its own hidden state: the tokens the fusion attends over.
            self.hidden = nn.ModuleList(
                nn.Sequential(nn.Linear(features, dim), nn.ReLU(inplace=True)) for _ in layout.names
            )
            self.heads = nn.ModuleList(nn.Linear(dim, size) for size in layout.sizes)
            self.fusion: nn.Module | None = AttentionFusion(
                len(layout.names), dim, layout.num_combined, zero_init=not self.fusion_only
            )
        else:
            self.hidden = nn.ModuleList(nn.Identity() for _ in layout.names)
            self.heads = nn.ModuleList(nn.Linear(features, size) for size in layout.sizes)
            self.fusion = None

    def forward_tasks(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(logits of each task, combined logits) of normalised images."""
        features = self.backbone.forward_features(x)
        hidden = [h(features) for h in self.hidden]
        task_logits = [head(h) for head, h in zip(self.heads, hidden)]
        if self.fusion is not None and self.fusion_only:
            return task_logits, self.fusion(torch.stack(hidden, dim=1)).float()
        combined = joint_log_probs(task_logits)
        if self.fusion is not None:
            combined = combined + self.fusion(torch.stack(hidden, dim=1)).float()
        return task_logits, combined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tasks(x)[1]

    # The optimizer's backbone/head groups (optim.backbone_lr_scale) and the fast-path epoch hook.
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return (p for n, p in self.named_parameters() if not n.startswith("backbone."))

    def set_epoch(self, epoch: int) -> None:
        hook = getattr(self.backbone, "set_epoch", None)
        if callable(hook):
            hook(epoch)


def _drop_classifier(backbone: nn.Module) -> None:
    """The backbone's own classifier is never used (the task heads replace it): keep it out of the weights."""
    if isinstance(backbone, ClassifierNet):
        backbone.head.fc = nn.Identity()
        return
    inner = getattr(backbone, "model", None)
    if inner is not None and hasattr(inner, "reset_classifier"):
        inner.reset_classifier(0)


def build_multitask_net(spec: dict[str, Any], layout: TaskLayout, in_chans: int, image_size: int) -> MultiTaskNet:
    """The backbone the ``model:`` section names (surgery, freezing, pretrained weights) with task heads on top."""
    backbone_spec = {k: v for k, v in spec.items() if k != "max_params"}
    backbone = build_model(backbone_spec, 2, in_chans, image_size)
    if not hasattr(backbone, "forward_features") or not hasattr(backbone, "num_features"):
        raise ConfigError(f"model {spec.get('name')!r} has no pooled features to put task heads on")
    _drop_classifier(backbone)
    net = MultiTaskNet(backbone, layout, spec.get("fusion"))
    check_param_budget(net, spec.get("max_params"))
    return net
