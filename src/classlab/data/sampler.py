"""``data.sampler: balanced``: every class equally likely in each training draw.

The alternative to class weights for skewed labels: instead of weighing the rare classes'
loss up, show them more often. Each epoch draws as many images as the training split holds,
with replacement, each image with probability 1 / (k * n_class), so each of the k classes
fills about 1/k of the epoch.

The draw of epoch ``e`` is a pure function of (seed, e), as the plain loaders' shuffles are:
a resumed run sees exactly the batches an uninterrupted one would. Under DDP every process
makes the same draw and takes every world_size-th image of it, so the processes together see
one balanced epoch, not world_size overlapping ones.
"""

from __future__ import annotations

import torch

from classlab.data.loaders import EpochSampler, MemoryLoader


def balanced_draw(labels: torch.Tensor, seed: int, epoch: int, n: int | None = None) -> torch.Tensor:
    """``n`` (default len(labels)) indices drawn with replacement, every class equally likely."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels)
    weights = 1.0 / counts[labels].double()
    g = torch.Generator().manual_seed(seed * 100_003 + epoch + 7_919)
    return torch.multinomial(weights, n or len(labels), replacement=True, generator=g)


class BalancedMemoryLoader(MemoryLoader):
    """The memory loader with a class-balanced draw in place of the epoch's permutation."""

    def _epoch_order(self, n: int) -> torch.Tensor:
        return balanced_draw(self.labels, self.seed, self.epoch, n)


class BalancedSampler(EpochSampler):
    """The same draw for the streaming DataLoader, this process's share of it."""

    def __init__(self, labels: torch.Tensor, seed: int) -> None:
        super().__init__(len(labels), seed)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def _epoch_order(self) -> torch.Tensor:
        return balanced_draw(self.labels, self.seed, self.epoch)
