"""Training augmentation of a whole uint8 batch at once, on whatever device the batch lives on.

Small datasets are decoded once into a uint8 tensor at the training resolution, so augmentation is the
only per-step data work left. Doing it per image in PIL would compete with the model for two CPU cores;
doing it here, as a few index gathers and at most one resampling per batch, keeps it under a few percent
of a step. Every sample still gets its own random parameters: they are drawn as small (N,) tensors from
the caller's ``torch.Generator``, so a seeded generator reproduces a batch exactly, on CPU or CUDA alike
(parameters are always drawn on the generator's device and then moved).

Order of the stages: geometric -> policy -> color -> flip -> erasing, the order torchvision recipes use.
Normalization to float is not done here: train, val and predict share it elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from classlab.config import AugSection

Tensor = torch.Tensor

# torchvision's RandomResizedCrop and RandomErasing constants, kept so recipes transfer unchanged.
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
ERASE_SCALE = (0.02, 0.33)
ERASE_RATIO = (0.3, 3.3)
ATTEMPTS = 10  # both torchvision samplers give up after this many boxes that do not fit
GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


class _Draw:
    """Random parameters for a batch, drawn on the generator's device so results do not depend on where the batch is."""

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator
        self.source = generator.device if generator is not None else torch.device("cpu")
        self.device = device

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        u = torch.rand(shape, generator=self.generator, device=self.source)
        return (low + (high - low) * u).to(self.device)

    def integers(self, high: int | Tensor, *shape: int) -> Tensor:
        """Uniform integers in [0, high); ``high`` may be a per-sample tensor (as torch.randint cannot)."""
        u = self.uniform(*shape)
        return (u * high).floor().long().clamp_min(0)

    def coin(self, p: float, n: int) -> Tensor:
        return self.uniform(n) < p

    def seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.source))


Op = Callable[[Tensor, _Draw], Tensor]


# ---------------------------------------------------------------------------------------------
# Integer shifts: exact pixel copies through one gather per axis, no interpolation
# ---------------------------------------------------------------------------------------------


def _take(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]: a per-sample crop/shift without a Python loop."""
    n, c, _, w = x.shape
    h_out, w_out = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h_out, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h_out, w_out))


def _reflect(index: Tensor, size: int) -> Tensor:
    """Mirror out-of-range indices back inside without repeating the edge pixel (torch's 'reflect' padding)."""
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def crop_padding(pad: int) -> Op:
    """RandomCrop(size, padding=pad): zero-pad by ``pad`` and crop back at a per-sample offset in [0, 2*pad]."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n, _, h, w = x.shape
        top = draw.integers(2 * pad + 1, n)
        left = draw.integers(2 * pad + 1, n)
        rows = top[:, None] - pad + torch.arange(h, device=x.device)
        cols = left[:, None] - pad + torch.arange(w, device=x.device)
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        out = _take(x, rows.clamp(0, h - 1), cols.clamp(0, w - 1))
        return out.masked_fill_(~inside, 0)

    return op


def translate(shift: int) -> Op:
    """Shift by up to ``shift`` pixels each way; reflect padding so no black border teaches the model an edge cue."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n, _, h, w = x.shape
        top = draw.integers(2 * shift + 1, n)
        left = draw.integers(2 * shift + 1, n)
        rows = _reflect(top[:, None] - shift + torch.arange(h, device=x.device), h)
        cols = _reflect(left[:, None] - shift + torch.arange(w, device=x.device), w)
        return _take(x, rows, cols)

    return op


# ---------------------------------------------------------------------------------------------
# Resampling: random resized crop and rotation share one affine grid and one grid_sample
# ---------------------------------------------------------------------------------------------


def _rrc_boxes(draw: _Draw, n: int, h: int, w: int, scale: tuple[float, float]) -> tuple[Tensor, ...]:
    """torchvision's RandomResizedCrop.get_params for N samples at once: 10 tries each, then a center crop."""
    area = h * w
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    target = area * draw.uniform(n, ATTEMPTS, low=scale[0], high=scale[1])
    aspect = torch.exp(draw.uniform(n, ATTEMPTS, low=log_lo, high=log_hi))
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.float().argmax(1, keepdim=True)  # the first box that fits, as the sequential loop would take
    cw, ch = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0]
    found = ok.any(1)
    in_ratio = w / h  # fallback of torchvision: the largest centered crop with an allowed aspect ratio
    if in_ratio < RRC_RATIO[0]:
        fw, fh = w, round(w / RRC_RATIO[0])
    elif in_ratio > RRC_RATIO[1]:
        fw, fh = round(h * RRC_RATIO[1]), h
    else:
        fw, fh = w, h
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    top = torch.where(found, draw.integers(h - ch + 1, n).float(), (h - ch) / 2)
    left = torch.where(found, draw.integers(w - cw + 1, n).float(), (w - cw) / 2)
    return top, left, ch, cw


def affine(size: int, scale: tuple[float, float] | None, degrees: float, rotate_first: bool = False) -> Op:
    """Random resized crop and rotation, composed into one affine map so each pixel is interpolated once.

    By default the rotation turns the crop about its own centre (crop, then rotate). ``rotate_first``
    turns the whole image about the image centre and crops the rotated picture, as torchvision's
    ``RandomRotation`` followed by ``RandomResizedCrop`` does (the STL-10 project's order): crops then
    hold the black corners the rotation uncovered. With a rotation, bilinear sampling without
    antialiasing: the crop is usually enlarged back to the training size, where antialiasing does
    nothing. Uncovered pixels are 0, as in RandomRotation. A crop alone is resized image by image,
    antialiased, as torchvision does (``_crop_resize``).
    """

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n, c, h, w = x.shape
        if scale is not None:
            top, left, ch, cw = _rrc_boxes(draw, n, h, w, scale)
            if degrees == 0:
                return _crop_resize(x, top, left, ch, cw, size)
        else:
            top = left = torch.zeros(n, device=x.device)
            ch, cw = torch.full((n,), float(h), device=x.device), torch.full((n,), float(w), device=x.device)
        # the crop box in grid_sample's normalized coordinates (align_corners=False: -1 and 1 are the image edges)
        center = torch.stack([(left + cw / 2) / w * 2 - 1, (top + ch / 2) / h * 2 - 1], dim=1)
        half = torch.stack([cw / w, ch / h], dim=1)
        theta = torch.zeros(n, 2, 3, device=x.device)
        if degrees > 0:
            angle = draw.uniform(n, low=-degrees, high=degrees) * (math.pi / 180)
            cos, sin = torch.cos(angle), torch.sin(angle)
            theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        else:
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        if rotate_first:
            # each output pixel -> its place in the crop box of the rotated image -> the source pixel
            v = F.affine_grid(_identity(n, x.device), [n, c, size, size], align_corners=False)
            in_rotated = v * half[:, None, None, :] + center[:, None, None, :]
            grid = torch.einsum("nij,nhwj->nhwi", theta[:, :, :2], in_rotated)
            outside = (grid.abs() > 1).any(-1)
        else:
            # v: where each output pixel lands in the (square) cropped frame after rotation; then into the source
            v = F.affine_grid(theta, [n, c, size, size], align_corners=False)
            grid = v * half[:, None, None, :] + center[:, None, None, :]
            outside = (v.abs() > 1).any(-1)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        if degrees > 0:
            out = out.masked_fill_(outside[:, None], 0.0)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    return op


def _crop_resize(x: Tensor, top: Tensor, left: Tensor, ch: Tensor, cw: Tensor, size: int) -> Tensor:
    """A crop without rotation: each box cut out and resized on its own, antialiased, uint8 to uint8.

    This is torchvision's ``RandomResizedCrop(antialias=True)`` to the pixel (boxes on whole pixels,
    the fallback centred with floor as ``get_params`` does), and on a CPU it is several times cheaper
    than sampling a float grid: torch resizes uint8 images directly.
    """
    boxes = torch.stack([top, left, ch, cw], 1).floor().long().tolist()
    crops = [img[None, :, t : t + bh, j : j + bw] for img, (t, j, bh, bw) in zip(x, boxes, strict=True)]
    return torch.cat([resize_batch(crop, size) for crop in crops])


def _identity(n: int, device: torch.device) -> Tensor:
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    return theta


# ---------------------------------------------------------------------------------------------
# Policies: torchvision's searched policies, applied image by image (the slow path)
# ---------------------------------------------------------------------------------------------


def policy(transform: Callable[[Tensor], Tensor]) -> Op:
    """Apply a torchvision v2 policy with its own draw per sample.

    This is the one per-sample Python loop in the pipeline (tens of microseconds an image): the policies are
    lists of PIL-era ops that torchvision applies one image at a time, and applying one draw to a whole batch
    would give every sample the same augmentation. torchvision draws from torch's global CPU generator, so the
    loop runs inside ``fork_rng`` seeded from our generator: reproducible, and the global stream is untouched.
    """

    def op(x: Tensor, draw: _Draw) -> Tensor:
        seed = draw.seed()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return torch.stack([transform(img) for img in x])

    return op


# ---------------------------------------------------------------------------------------------
# Color, flips, erasing
# ---------------------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b)[:, None]


def color_jitter(strength: float) -> Op:
    """Brightness, contrast and saturation factors each uniform in [1-s, 1+s] per sample (no hue: it is slow
    and rarely helps on natural-image classification). Fixed order instead of torchvision's random one, so the
    whole batch is three fused blends; the result is rounded once instead of truncated after every step."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n = x.shape[0]
        lo, hi = max(0.0, 1 - strength), 1 + strength
        b, c, s = (draw.uniform(n, low=lo, high=hi)[:, None, None, None] for _ in range(3))
        y = (x.float() * b).clamp_(0, 255)
        mean = _gray(y).mean((1, 2, 3), keepdim=True)
        y = (c * y + (1 - c) * mean).clamp_(0, 255)
        if x.shape[1] == 3:
            y = (s * y + (1 - s) * _gray(y)).clamp_(0, 255)
        return y.round_().to(torch.uint8)

    return op


def flip(dim: int) -> Op:
    """Mirror each sample with p=0.5 along ``dim`` (3: horizontal, 2: vertical)."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        chosen = draw.coin(0.5, x.shape[0])[:, None, None, None]
        return torch.where(chosen, x.flip(dim), x)

    return op


def _fill(x: Tensor, boxes: tuple[Tensor, Tensor, Tensor, Tensor], fill: Tensor) -> Tensor:
    """Paint each sample's box [top, bottom) x [left, right) with ``fill``; boxes may reach past the edges."""
    top, bottom, left, right = (t[:, None] for t in boxes)
    rows = torch.arange(x.shape[2], device=x.device)[None, :]
    cols = torch.arange(x.shape[3], device=x.device)[None, :]
    inside = ((rows >= top) & (rows < bottom))[:, None, :, None] & ((cols >= left) & (cols < right))[:, None, None, :]
    return torch.where(inside, fill.view(1, -1, 1, 1), x)


def cutout(side: int, fill: Tensor) -> Op:
    """A ``side`` x ``side`` square at a uniform random center per sample; it may hang over the edge, so the
    network still sees fully visible objects sometimes (DeVries & Taylor 2017)."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n, _, h, w = x.shape
        top = draw.integers(h, n) - side // 2
        left = draw.integers(w, n) - side // 2
        return _fill(x, (top, top + side, left, left + side), fill.to(x.device))

    return op


def random_erasing(p: float, fill: Tensor) -> Op:
    """torchvision's RandomErasing per sample: with probability ``p`` a box of 2-33% of the area and aspect
    ratio 0.3-3.3, the first of 10 tries that fits; a sample none fits is left alone."""

    def op(x: Tensor, draw: _Draw) -> Tensor:
        n, _, h, w = x.shape
        chosen = draw.coin(p, n)
        area = h * w * draw.uniform(n, ATTEMPTS, low=ERASE_SCALE[0], high=ERASE_SCALE[1])
        aspect = torch.exp(draw.uniform(n, ATTEMPTS, low=math.log(ERASE_RATIO[0]), high=math.log(ERASE_RATIO[1])))
        eh = torch.sqrt(area * aspect).round().long()
        ew = torch.sqrt(area / aspect).round().long()
        ok = (eh < h) & (ew < w)
        first = ok.float().argmax(1, keepdim=True)
        eh, ew = eh.gather(1, first)[:, 0], ew.gather(1, first)[:, 0]
        eh = torch.where(chosen & ok.any(1), eh, torch.zeros_like(eh))  # an empty box erases nothing
        top = draw.integers(h - eh + 1, n)
        left = draw.integers(w - ew + 1, n)
        return _fill(x, (top, top + eh, left, left + ew), fill.to(x.device))

    return op


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class BatchAugment:
    """The enabled ops in their fixed order; call it on a uint8 (N, C, H, W) batch with a generator."""

    def __init__(self, ops: Sequence[tuple[str, Op]], image_size: int, resamples: bool) -> None:
        self.ops = list(ops)
        self.names: list[str] = [name for name, _ in self.ops]
        self.image_size = image_size
        self.resamples = resamples  # random_resized_crop/rotation produce image_size from any input size

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"batch augmentation expects a uint8 (N, C, H, W) tensor, got {x.dtype} {tuple(x.shape)}")
        if not self.resamples and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"batch of {tuple(x.shape[2:])} images but image_size is {self.image_size}: "
                "images are resized to image_size once, when decoded, before augmentation"
            )
        if x.shape[0] == 0:
            return x
        draw = _Draw(generator, x.device)
        for _, op in self.ops:
            x = op(x, draw)
        return x

    def __repr__(self) -> str:
        return f"BatchAugment({', '.join(self.names)}; image_size={self.image_size})"


def build_batch_augment(aug: AugSection, image_size: int, fill: Sequence[int] | None = None) -> BatchAugment | None:
    """The training augmentation a config asks for, or None when it asks for none.

    ``fill`` is the uint8 color of cutout and erasing boxes (default black). Pass the dataset mean to get
    what the papers did after normalization (a box that normalizes to zero).
    """
    from torchvision.transforms import v2

    fill_t = torch.tensor(list(fill) if fill is not None else [0], dtype=torch.uint8)
    ops: list[tuple[str, Op]] = []
    if aug.random_resized_crop is not None or aug.rotation > 0:
        scale: tuple[float, float] | None = None
        if aug.random_resized_crop is not None:
            scale = (float(aug.random_resized_crop[0]), float(aug.random_resized_crop[1]))
            if not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"aug.random_resized_crop = {list(scale)}: need 0 < low <= high <= 1")
        op = affine(image_size, scale, aug.rotation, rotate_first=aug.rotate_first)
        if scale is not None and aug.rotate_first and aug.rotation > 0:
            ops.append(("rotation", op))
            ops.append(("random_resized_crop", lambda x, draw: x))  # done by the same resampling, listed for the log
        elif scale is not None:
            ops.append(("random_resized_crop", op))
            if aug.rotation > 0:
                ops.append(("rotation", lambda x, draw: x))  # done by the same resampling, listed for the log
        else:
            ops.append(("rotation", op))
    if aug.crop_padding > 0:
        ops.append(("crop_padding", crop_padding(aug.crop_padding)))
    if aug.translate > 0:
        ops.append(("translate", translate(aug.translate)))
    if aug.autoaugment is not None:
        pol = v2.AutoAugmentPolicy(aug.autoaugment)
        ops.append(("autoaugment", policy(v2.AutoAugment(pol))))
    if aug.randaugment is not None:
        num_ops, magnitude = aug.randaugment
        ops.append(("randaugment", policy(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))))
    if aug.trivialaugment:
        ops.append(("trivialaugment", policy(v2.TrivialAugmentWide())))
    if aug.color_jitter > 0:
        ops.append(("color_jitter", color_jitter(aug.color_jitter)))
    if aug.flip:
        ops.append(("flip", flip(3)))
    if aug.vflip:
        ops.append(("vflip", flip(2)))
    if aug.cutout > 0:
        ops.append(("cutout", cutout(aug.cutout, fill_t)))
    if aug.random_erasing > 0:
        ops.append(("random_erasing", random_erasing(aug.random_erasing, fill_t)))
    if not ops:
        return None
    return BatchAugment(ops, image_size, resamples=aug.random_resized_crop is not None or aug.rotation > 0)


# ---------------------------------------------------------------------------------------------
# Progressive resizing
# ---------------------------------------------------------------------------------------------


def scheduled_size(schedule: Sequence[Sequence[int]] | None, epoch: int) -> int | None:
    """The training size ``aug.size_schedule`` gives this epoch (the last stage begun), or None without one."""
    size = None
    for start, stage_size in schedule or ():
        if epoch >= start:
            size = int(stage_size)
    return size


def resize_batch(x: Tensor, size: int) -> Tensor:
    """A uint8 batch resized to ``size`` x ``size`` with antialiased bilinear filtering, still uint8.

    Downscaling after augmentation keeps every augmentation exactly as configured and costs one
    resampling; antialiasing matters when shrinking (without it 32 -> 24 px aliases fine texture).
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if x.device.type == "cpu":
        x = x.contiguous()
        # torch resamples uint8 directly on CPU (the path torchvision's Resize uses): no float copy.
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)
