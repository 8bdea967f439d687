"""Batch augmentation and MixUp/CutMix: each op does what its name promises, per sample, reproducibly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from classlab.config import AugSection
from classlab.data.augment import build_batch_augment
from classlab.engine.mixing import Mixing, build_mixing, cutmix_box

OFF = {"crop_padding": 0, "flip": False}  # AugSection turns these on by default
SIZE = 16


def only(**kwargs: object) -> AugSection:
    return AugSection(**{**OFF, **kwargs})


def noise(n: int = 16, size: int = SIZE, low: int = 0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def run(aug: AugSection, x: torch.Tensor, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    pipeline = build_batch_augment(aug, size)
    assert pipeline is not None
    return pipeline(x, torch.Generator().manual_seed(seed))


EVERY_OP = {
    "crop_padding": {"crop_padding": 4},
    "translate": {"translate": 3},
    "flip": {"flip": True},
    "vflip": {"vflip": True},
    "random_resized_crop": {"random_resized_crop": (0.35, 1.0)},
    "rotation": {"rotation": 30.0},
    "color_jitter": {"color_jitter": 0.4},
    "autoaugment": {"autoaugment": "cifar10"},
    "randaugment": {"randaugment": (2, 9)},
    "trivialaugment": {"trivialaugment": True},
    "cutout": {"cutout": 6},
    "random_erasing": {"random_erasing": 1.0},
}


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def test_nothing_enabled_builds_nothing() -> None:
    assert build_batch_augment(only(), SIZE) is None


def test_names_follow_the_stage_order() -> None:
    aug = AugSection(
        crop_padding=4, translate=2, flip=True, vflip=True, random_resized_crop=(0.5, 1.0), rotation=10,
        color_jitter=0.2, randaugment=(2, 9), cutout=4, random_erasing=0.25,
    )  # fmt: skip
    pipeline = build_batch_augment(aug, SIZE)
    assert pipeline is not None
    assert pipeline.names == [
        "random_resized_crop", "rotation", "crop_padding", "translate", "randaugment",
        "color_jitter", "flip", "vflip", "cutout", "random_erasing",
    ]  # fmt: skip


def test_wrong_input_size_is_a_clear_error() -> None:
    pipeline = build_batch_augment(only(flip=True), SIZE)
    assert pipeline is not None
    with pytest.raises(ValueError, match="image_size"):
        pipeline(noise(size=SIZE + 2))
    with pytest.raises(TypeError, match="uint8"):
        pipeline(noise().float())


# ---------------------------------------------------------------------------------------------
# Every op: shape, dtype, device, reproducibility, per-sample randomness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(EVERY_OP))
def test_op_keeps_shape_dtype_and_is_reproducible(name: str) -> None:
    x = noise()
    aug = only(**EVERY_OP[name])
    first, again, other = run(aug, x, seed=1), run(aug, x, seed=1), run(aug, x, seed=2)
    assert first.shape == x.shape and first.dtype == torch.uint8 and first.device == x.device
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


@pytest.mark.parametrize("name", list(EVERY_OP))
def test_op_draws_per_sample(name: str) -> None:
    """The same image repeated in a batch must not come out the same everywhere."""
    x = noise(n=1).expand(12, -1, -1, -1).contiguous()
    out = run(only(**EVERY_OP[name]), x, seed=3)
    assert len({bytes(img.flatten().tolist()) for img in out}) > 1


def test_policies_leave_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(only(trivialaugment=True), noise(n=4))
    assert torch.equal(torch.rand(3), expected)


def test_all_ops_together_reproducible() -> None:
    aug = AugSection(**{k: v for spec in EVERY_OP.values() for k, v in spec.items()})
    x = noise()
    assert torch.equal(run(aug, x, seed=5), run(aug, x, seed=5))


# ---------------------------------------------------------------------------------------------
# What each op does
# ---------------------------------------------------------------------------------------------


def test_flip_mirrors_some_samples_and_leaves_the_rest() -> None:
    x = noise(n=32)
    out = run(only(flip=True), x)
    mirrored = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x)]
    kept = [torch.equal(o, s) for o, s in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept))  # each sample exactly one of the two
    assert 4 <= sum(mirrored) <= 28


def test_vflip_mirrors_vertically() -> None:
    x = noise(n=32)
    out = run(only(vflip=True), x)
    flipped = [torch.equal(o, s.flip(-2)) for o, s in zip(out, x)]
    assert all(f or torch.equal(o, s) for f, o, s in zip(flipped, out, x))
    assert 4 <= sum(flipped) <= 28


def _offsets(out: torch.Tensor, padded: torch.Tensor, span: int) -> list[tuple[int, int]]:
    """The (top, left) offsets in ``padded`` at which the window equals ``out``."""
    h, w = out.shape[-2:]
    return [(i, j) for i in range(span) for j in range(span) if torch.equal(padded[..., i : i + h, j : j + w], out)]


def test_crop_padding_takes_a_window_of_the_zero_padded_source() -> None:
    pad = 3
    x = noise(n=12, low=1)
    out = run(only(crop_padding=pad), x)
    seen = set()
    for o, s in zip(out, x):
        found = _offsets(o, F.pad(s, (pad,) * 4), 2 * pad + 1)
        assert len(found) == 1
        seen.add(found[0])
    assert len(seen) > 3


def test_translate_takes_a_window_of_the_reflect_padded_source() -> None:
    shift = 2
    x = noise(n=12)
    out = run(only(translate=shift), x)
    for o, s in zip(out, x):
        padded = F.pad(s[None].float(), (shift,) * 4, mode="reflect")[0].to(torch.uint8)
        assert len(_offsets(o, padded, 2 * shift + 1)) == 1


def _box(zero: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) of the zeroed region, checked to be one axis-aligned rectangle."""
    rows, cols = zero.any(1), zero.any(0)
    assert torch.equal(zero, rows[:, None] & cols[None, :])
    r, c = rows.nonzero().flatten(), cols.nonzero().flatten()
    if len(r) == 0:
        return None
    assert len(r) == r[-1] - r[0] + 1 and len(c) == c[-1] - c[0] + 1  # contiguous
    return len(r), len(c)


def test_cutout_zeroes_one_square_of_side_c() -> None:
    side = 5
    x = noise(n=32, low=1)  # no zero pixels before
    out = run(only(cutout=side), x)
    inside = 0
    for o, s in zip(out, x):
        zero = (o == 0).all(0)
        assert torch.equal(o[:, ~zero], s[:, ~zero])  # everything else untouched
        box = _box(zero)
        assert box is not None and box[0] <= side and box[1] <= side
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        if 0 < rows[0] and rows[-1] < SIZE - 1 and 0 < cols[0] and cols[-1] < SIZE - 1:
            assert box == (side, side) and int(zero.sum()) == side * side
            inside += 1
    assert inside > 5


def test_random_erasing_boxes_follow_torchvision_ranges() -> None:
    x = noise(n=32, low=1)
    out = run(only(random_erasing=1.0), x)
    erased = 0
    for o, s in zip(out, x):
        zero = (o == 0).all(0)
        assert torch.equal(o[:, ~zero], s[:, ~zero])
        box = _box(zero)
        if box is None:
            continue
        erased += 1
        h, w = box
        assert h < SIZE and w < SIZE
        area = h * w / SIZE**2
        assert 0.02 * 0.5 <= area <= 0.33 * 1.5  # rounding of h and w on a 16 px image
        assert 0.3 / 1.5 <= h / w <= 3.3 * 1.5
    assert erased >= 28


def test_random_erasing_probability() -> None:
    x = noise(n=400, low=1)
    out = run(only(random_erasing=0.25), x)
    fraction = (out == 0).flatten(1).any(1).float().mean().item()
    assert 0.15 < fraction < 0.35


def test_random_resized_crop_of_the_whole_image_is_exact() -> None:
    x = noise()
    assert torch.equal(run(only(random_resized_crop=(1.0, 1.0)), x), x)


def test_random_resized_crop_resizes_to_image_size() -> None:
    x = noise(n=4, size=24)
    out = run(only(random_resized_crop=(0.5, 1.0)), x, size=SIZE)
    assert out.shape == (4, 3, SIZE, SIZE)


def test_random_resized_crop_zooms_into_a_gradient() -> None:
    """On a horizontal ramp a crop narrows the range of values; a whole-image crop would keep it."""
    ramp = torch.linspace(0, 255, SIZE).round().to(torch.uint8).expand(8, 3, SIZE, SIZE).contiguous()
    out = run(only(random_resized_crop=(0.1, 0.3)), ramp)
    span = (out.amax((1, 2, 3)).int() - out.amin((1, 2, 3)).int()).float()
    assert (span < 0.8 * 255).all()
    assert (out.diff(dim=-1).int() >= 0).all()  # still a ramp, never mirrored or rotated


def test_random_resized_crop_is_torchvisions_on_the_same_boxes() -> None:
    """Crop then antialiased resize, as RandomResizedCrop(antialias=True): shrinking and enlarging alike."""
    from torchvision.transforms.v2 import functional as TF

    from classlab.data.augment import _crop_resize, _Draw, _rrc_boxes

    x = noise(n=8, size=40)
    top, left, ch, cw = _rrc_boxes(_Draw(torch.Generator().manual_seed(3), x.device), 8, 40, 40, (0.05, 1.0))
    for size in (SIZE, 48):  # boxes larger and smaller than the output
        out = _crop_resize(x, top, left, ch, cw, size)
        for i in range(8):
            box = int(top[i]), int(left[i]), int(ch[i]), int(cw[i])
            ref = TF.resized_crop(x[i], *box, [size, size], antialias=True)
            assert (out[i].int() - ref.int()).abs().max() <= 1


def test_rotation_fills_corners_and_keeps_the_center() -> None:
    x = torch.full((8, 3, SIZE, SIZE), 200, dtype=torch.uint8)
    out = run(only(rotation=180.0), x)
    assert (out[..., 6:10, 6:10] == 200).all()
    tilted = (out[:, 0, 0, 0] == 0) | (out[:, 0, 0, -1] == 0) | (out[:, 0, -1, 0] == 0) | (out[:, 0, -1, -1] == 0)
    assert tilted.sum() >= 6  # a rotation by more than a few degrees uncovers a corner


def test_tiny_rotation_is_nearly_identity() -> None:
    x = noise()
    out = run(only(rotation=1e-4), x)
    assert (out.int() - x.int()).abs().max() <= 1


def test_color_jitter_factors_stay_within_strength() -> None:
    """On a flat gray image contrast and saturation do nothing, so only brightness in [1-s, 1+s] shows."""
    s = 0.4
    x = torch.full((64, 3, SIZE, SIZE), 100, dtype=torch.uint8)
    out = run(only(color_jitter=s), x)
    assert (out == out[:, :1, :1, :1]).all()  # still flat per sample
    values = out[:, 0, 0, 0].float()
    assert values.min() >= 100 * (1 - s) - 1 and values.max() <= 100 * (1 + s) + 1
    assert values.std() > 5


def test_color_jitter_single_channel() -> None:
    x = noise()[:, :1]
    out = run(only(color_jitter=0.5), x)
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_exact_ops() -> None:
    aug = only(crop_padding=4, translate=2, flip=True, vflip=True, cutout=5, random_erasing=0.5)
    x = noise()
    pipeline = build_batch_augment(aug, SIZE)
    assert pipeline is not None
    cpu = pipeline(x, torch.Generator().manual_seed(0))
    gpu = pipeline(x.cuda(), torch.Generator().manual_seed(0))
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


# ---------------------------------------------------------------------------------------------
# MixUp and CutMix
# ---------------------------------------------------------------------------------------------

CLASSES = 5


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the constant i, so every pixel tells which sample it came from; labels differ from their pair's."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, SIZE, SIZE).contiguous()
    return x, torch.arange(n) % CLASSES


def test_no_alpha_builds_no_mixing() -> None:
    assert build_mixing(AugSection(), CLASSES, 0.1) is None
    assert build_mixing(AugSection(cutmix_alpha=1.0), CLASSES, 0.1) is not None


@pytest.mark.parametrize("mixing", [Mixing(CLASSES, label_smoothing=0.1), Mixing(CLASSES, 1.0, 1.0, 0.0, 0.1)])
def test_unmixed_loss_is_label_smoothed_cross_entropy(mixing: Mixing) -> None:
    x, y = batch()
    mixed, target = mixing(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, x)
    logits = torch.randn(len(y), CLASSES, generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(mixing.loss(logits, target), expected)
    torch.testing.assert_close(mixing.loss(logits, y), expected)


def test_mixup_blends_images_and_targets_alike() -> None:
    x, y = batch()
    mixing = Mixing(CLASSES, mixup_alpha=1.0)
    mixed, target = mixing(x, y, torch.Generator().manual_seed(0))
    lam = target[0, y[0]].item()
    assert 0 < lam < 1 and mixing.last == ("mixup", pytest.approx(lam))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(target.sum(1), torch.ones(len(y)))


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_box_area_matches_lambda(seed: int) -> None:
    x, y = batch()
    mixed, target = Mixing(CLASSES, cutmix_alpha=1.0, label_smoothing=0.1)(x, y, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(target.sum(1), torch.ones(len(y)))
    pasted = mixed[0, 0] == x.flip(0)[0, 0]  # pixels of sample 0 now from its partner
    assert torch.equal(mixed[0, 0][~pasted], x[0, 0][~pasted])
    lam = 1 - pasted.float().mean().item()
    off = 0.1 / CLASSES
    expected = torch.full((CLASSES,), off)
    expected[y[0]] += lam * (1 - 0.1)
    expected[y[-1]] += (1 - lam) * (1 - 0.1)
    torch.testing.assert_close(target[0], expected)


def test_cutmix_box_clips_and_keeps_area_when_inside() -> None:
    top, bottom, left, right = cutmix_box(32, 32, 0.75, 16, 16)
    assert (bottom - top) * (right - left) == 16 * 16
    top, bottom, left, right = cutmix_box(32, 32, 0.75, 0, 31)
    assert (top, right) == (0, 32) and bottom - top == 8 and right - left == 9


def test_both_alphas_switch_between_modes_and_respect_mix_prob() -> None:
    x, y = batch()
    mixing = Mixing(CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.5)
    g = torch.Generator().manual_seed(0)
    modes = []
    for _ in range(200):
        mixing(x, y, g)
        modes.append(mixing.last[0])
    assert 70 < modes.count("none") < 130
    assert modes.count("cutmix") > 25 and modes.count("mixup") > 25


def test_mixing_is_reproducible_under_the_generator() -> None:
    x, y = batch()
    mixing = Mixing(CLASSES, mixup_alpha=0.4, cutmix_alpha=1.0)
    a = [mixing(x, y, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])
    assert not torch.equal(a[0][1], a[2][1])


def test_mixed_loss_is_the_mix_of_the_two_losses() -> None:
    x, y = batch()
    mixing = Mixing(CLASSES, mixup_alpha=1.0)
    _, target = mixing(x, y, torch.Generator().manual_seed(0))
    lam = mixing.last[1]
    logits = torch.randn(len(y), CLASSES)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y.flip(0))
    assert math.isclose(mixing.loss(logits, target).item(), expected.item(), rel_tol=1e-5)
