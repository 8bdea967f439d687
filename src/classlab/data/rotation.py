"""The rotation pretext (Gidaris et al., ICLR 2018): predict which of 0/90/180/270 degrees an image was turned.

Any source becomes a labelled one this way, so unlabelled folders can pretrain a backbone.
All four rotations of an image sit in the same batch, as in the paper, which makes the
task's signal about the image's content rather than about batch statistics.
"""

from __future__ import annotations

import torch

ANGLES = (0, 90, 180, 270)


def rotate_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) square images -> (4N, C, H, W) rotated copies and labels 0-3 (k quarter turns anticlockwise)."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError("rotation needs square images (data.image_size makes them square)")
    views = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    labels = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
    return torch.cat(views), labels
