"""MixUp and CutMix on a normalized float batch, with the soft targets and the loss that go with them.

These follow timm's ``Mixup`` in 'batch' mode (one lambda a batch, sample i paired with sample N-1-i,
CutMix's lambda corrected to the box actually pasted, label smoothing folded into the targets), but draw
every random number from the caller's ``torch.Generator``: timm uses numpy's global generator, which our
seeding does not reproduce and which worker processes share.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from classlab.config import AugSection

Tensor = torch.Tensor


def smooth_one_hot(y: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Targets for which soft-target cross-entropy equals ``F.cross_entropy(..., label_smoothing=smoothing)``."""
    off = smoothing / num_classes
    out = torch.full((y.shape[0], num_classes), off, device=y.device, dtype=torch.float32)
    return out.scatter_(1, y[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The box (top, bottom, left, right) whose area is ``1 - lam`` of the image, centered at (cy, cx) and
    clipped to the image; the caller recomputes lambda from the clipped area."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    top, left = cy - ch // 2, cx - cw // 2
    return max(top, 0), min(top + ch, height), max(left, 0), min(left + cw, width)


class Mixing:
    """Mixes a batch (with probability ``mix_prob``) and returns the targets the loss needs.

    With both alphas positive each mixed batch is CutMix with probability ``switch_prob``, else MixUp.
    With both alphas zero it never mixes, and ``loss`` is exactly label-smoothed cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        label_smoothing: float = 0.0,
        switch_prob: float = 0.5,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mix_prob = mix_prob
        self.label_smoothing = label_smoothing
        self.switch_prob = switch_prob
        self.last: tuple[str, float] = ("none", 1.0)  # (mode, lambda) of the last batch, for logging

    def _params(self, generator: torch.Generator | None, height: int, width: int) -> tuple[str, float, int, int]:
        """(mode, lambda, box center row, box center column) for one batch, all drawn from ``generator``."""
        device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(4, generator=generator, device=device).tolist()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        if u[0] >= self.mix_prob or (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0):
            return "none", 1.0, 0, 0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            mode = "cutmix" if u[1] < self.switch_prob else "mixup"
        else:
            mode = "cutmix" if self.cutmix_alpha > 0 else "mixup"
        alpha = self.cutmix_alpha if mode == "cutmix" else self.mixup_alpha
        # torch's Beta sampler takes no generator; Python's does, seeded from ours
        lam = random.Random(seed).betavariate(alpha, alpha)
        return mode, lam, min(int(u[2] * height), height - 1), min(int(u[3] * width), width - 1)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        h, w = x.shape[-2:]
        mode, lam, cy, cx = self._params(generator, h, w)
        if mode == "cutmix":
            top, bottom, left, right = cutmix_box(h, w, lam, cy, cx)
            x = x.clone()
            x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / (h * w)
        elif mode == "mixup":
            x = x * lam + x.flip(0) * (1.0 - lam)
        self.last = (mode, lam)
        target = smooth_one_hot(y, self.num_classes, self.label_smoothing)
        if mode != "none":
            target = target * lam + target.flip(0) * (1.0 - lam)
        return x, target

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Soft-target cross-entropy, batch mean; class indices are accepted too (validation batches)."""
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def __repr__(self) -> str:
        return (
            f"Mixing(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, mix_prob={self.mix_prob}, "
            f"label_smoothing={self.label_smoothing})"
        )


def build_mixing(aug: AugSection, num_classes: int, label_smoothing: float) -> Mixing | None:
    """MixUp/CutMix as configured, or None when both alphas are zero (then plain label-smoothed CE applies)."""
    if aug.mixup_alpha <= 0 and aug.cutmix_alpha <= 0:
        return None
    return Mixing(
        num_classes,
        mixup_alpha=aug.mixup_alpha,
        cutmix_alpha=aug.cutmix_alpha,
        mix_prob=aug.mix_prob,
        label_smoothing=label_smoothing,
    )
