"""Test-time augmentation: show the model several views of each image and average its softmax.

Two kinds of view. ``flip``, ``translate`` and ``diagonal`` work on the uint8 batch the loaders already serve
at the training resolution, so they cost nothing but forward passes and the fast-path recipe can
call :func:`tta_views` inside its own loop. ``tencrop`` and ``multiscale`` need the picture at a
larger size than training saw (a ten-crop of an image already cropped to the training size would
crop away content that the plain evaluation sees), so they start from the original image:
:func:`image_views` resizes its shorter side to each scale and takes the four corner crops, the
centre crop and their mirror images at the training resolution, and one softmax average is taken
over every view of every scale (the standard 10-crop of Krizhevsky et al., repeated per scale).

That is neither of the two published multi-scale protocols, which classlab offers beside it:

- ``perscale:S1,S2,..`` is the ResNet reproduction project's: ten S x S crops at each scale S
  (the network runs at S px), an accuracy per scale, and the mean of those accuracies;
- ``fullconv:S1,S2,..`` is He et al. 2016's best-result protocol: the whole image resized to each
  shorter side, scored fully-convolutionally, softmax averaged over the scales (``flip`` adds mirrors).

Softmax averaging (not logit averaging) is what those papers report, and it keeps a single
overconfident view from outvoting the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from classlab.data.preprocess import to_mode
from classlab.engine.metrics import top_k_accuracy
from classlab.engine.predict import eval_loop
from classlab.errors import ClassLabError, did_you_mean, option, option_name, spelt

BATCH_MODES = ("flip", "translate", "diagonal")
SHIFT_MODES = ("translate", "diagonal")  # two sets of shifted views: a plan takes one
IMAGE_MODES = ("tencrop", "multiscale", "perscale", "fullconv")
MODES = BATCH_MODES + IMAGE_MODES
SCALE_MODES = ("multiscale", "perscale", "fullconv")  # modes that take shorter-side sizes: mode:S1,S2,...

# ``tencrop`` without scales crops from the image resized to 256/224 of the training size: the
# ImageNet ratio, which leaves the crops enough room to differ without losing the object.
TENCROP_RATIO = 256 / 224


@dataclass(frozen=True)
class TTAPlan:
    """A parsed ``--tta`` value: which batch-level modes, the scales of image-level views and how
    they are scored.

    ``protocol``: ``average`` (ten training-size crops of every scale, one softmax average over all
    views), ``perscale`` (ten crops of S px at each scale S, an accuracy per scale and their mean:
    the ResNet reproduction project's protocol) or ``fullconv`` (the whole image at each scale,
    scored fully-convolutionally, softmax averaged over scales: He et al. 2016's best results).
    """

    text: str
    batch_modes: tuple[str, ...] = ()
    scales: tuple[int, ...] = ()  # empty: no image-level views
    notes: list[str] = field(default_factory=list, compare=False)
    protocol: str = "average"

    @property
    def needs_originals(self) -> bool:
        return bool(self.scales)


def _tokens(text: str, image_size: int) -> tuple[list[str], list[int]]:
    """The mode names of ``text`` in order, and the scales given to its scale-taking mode."""
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens:
        raise ClassLabError(
            f"{option('tta', text, quoted=True)}: give one or more of {', '.join(MODES)} "
            f"(e.g. {option('tta', 'flip,translate')})"
        )
    modes: list[str] = []
    scales: list[int] = []
    current = None
    for token in tokens:
        if token.isdigit() and current in SCALE_MODES:
            scales.append(int(token))
            continue
        name, _, arg = token.partition(":")
        name = name.lower()
        if name not in MODES:
            raise ClassLabError(
                f"{option_name('tta')}: unknown mode '{name}'{did_you_mean(name, MODES)}; choose from "
                f"{', '.join(MODES)}"
                " (multiscale, perscale and fullconv take sizes: multiscale:224,256,384)"
            )
        if name in SCALE_MODES:
            if not arg or not arg.isdigit():
                raise ClassLabError(
                    f"{option_name('tta')} {name} needs the shorter-side sizes, e.g. {name}:{image_size},"
                    f"{round(image_size * TENCROP_RATIO)},{image_size * 2}"
                )
            scales.append(int(arg))
        elif arg:
            raise ClassLabError(f"{option_name('tta')} {name} takes no value (got '{token}')")
        if name in modes:
            raise ClassLabError(f"{option_name('tta')} {name} is given twice in '{text}': give each mode once")
        modes.append(name)
        current = name
    return modes, scales


def parse_tta(text: str, image_size: int) -> TTAPlan:
    """``flip,translate`` / ``tencrop`` / ``multiscale:224,256,384`` / ``perscale:224,256`` /
    ``fullconv:224,256,384,480,640`` (modes joined by commas).

    Bare numbers after a scale-taking mode are its scales, so ``flip,multiscale:32,40`` reads as two modes.
    """
    modes, scales = _tokens(text, image_size)
    protocols = [m for m in modes if m in ("perscale", "fullconv")]
    if len(set(SHIFT_MODES) & set(modes)) > 1:
        raise ClassLabError(
            f"{option_name('tta')} translate and diagonal are two sets of shifted views: choose one "
            "(translate: 4 shifts, 5 views; diagonal: 2 shifts at half the weight, airbench's 3 views)"
        )
    if len(protocols) > 1 or (protocols and ({"multiscale", "tencrop", *SHIFT_MODES} & set(modes))):
        raise ClassLabError(
            f"{option_name('tta')} {protocols[0]} is a testing protocol of its own: combine it only with flip"
            + (" (fullconv)" if protocols[0] == "fullconv" else "")
        )
    if "tencrop" in modes:
        scales.append(round(image_size * TENCROP_RATIO))
    small = [s for s in scales if s < image_size]
    if small and not protocols:
        raise ClassLabError(
            f"{option_name('tta')} multiscale: sizes {', '.join(map(str, small))} are below the training resolution "
            f"{image_size}; "
            f"ten crops of {image_size} px need a shorter side of at least {image_size}"
        )
    batch_modes = tuple(m for m in modes if m in BATCH_MODES)
    notes: list[str] = []
    if scales and "flip" in batch_modes and protocols != ["fullconv"]:
        # The ten crops already hold the mirror images; flipping again would only repeat views.
        batch_modes = tuple(m for m in batch_modes if m != "flip")
        notes.append("flip is part of the ten crops")
    return TTAPlan(
        text=",".join(t.strip() for t in text.split(",") if t.strip()),
        batch_modes=batch_modes,
        scales=tuple(dict.fromkeys(scales)),
        notes=notes,
        protocol=protocols[0] if protocols else "average",
    )


def translate_shift(image_size: int) -> int:
    """Pixels to shift by: 2 at CIFAR's 32 px (airbench), growing with the resolution."""
    return max(1, round(image_size / 16))


def tta_views(x: torch.Tensor, modes: Iterable[str], image_size: int | None = None) -> list[torch.Tensor]:
    """Views of a (B, C, H, W) batch for the batch-level modes; the first view is ``x`` itself.

    ``flip`` mirrors left-right; ``translate`` shifts by a few pixels in the four diagonal
    directions with reflection padding (so no black borders the model never saw in training);
    ``diagonal`` shifts by half that, up-left and down-right only (airbench's level-2 TTA; its
    views carry half the weight together: :func:`view_weights`). Modes multiply: ``flip,translate``
    gives 2 x 5 = 10 views, ``flip,diagonal`` 2 x 3 = 6. Works on uint8 or float batches.
    """
    modes = list(modes)
    unknown = [m for m in modes if m not in BATCH_MODES]
    if unknown:
        raise ClassLabError(f"tta_views: '{unknown[0]}' is not a batch-level mode ({', '.join(BATCH_MODES)})")
    views = [x]
    if "translate" in modes:
        d = translate_shift(image_size or x.shape[-1])
        views = views + _shifted(x, d, ((0, 0), (0, 2 * d), (2 * d, 0), (2 * d, 2 * d)))
    if "diagonal" in modes:
        d = max(1, translate_shift(image_size or x.shape[-1]) // 2)
        views = views + _shifted(x, d, ((0, 0), (2 * d, 2 * d)))
    if "flip" in modes:
        views = views + [v.flip(-1) for v in views]
    return views


def _shifted(x: torch.Tensor, d: int, corners: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Crops of ``x`` reflect-padded by ``d``, each at a (top, left) corner of the padded batch."""
    h, w = x.shape[-2:]
    padded = F.pad(x.float(), (d, d, d, d), mode="reflect").to(x.dtype)
    return [padded[..., dy : dy + h, dx : dx + w].contiguous() for dy, dx in corners]


def ten_crops(img: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Four corners, centre and their mirror images of a (C, H, W) tensor at least ``size`` each way."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ClassLabError(f"ten_crops: image {h}x{w} is smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    crops = [img[..., y : y + size, x : x + size] for y, x in corners]
    return crops + [c.flip(-1) for c in crops]


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """The shorter side to ``size``, keeping the aspect ratio (the same rule as ``preprocess.fit``)."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)


def image_views(img: Image.Image, scales: Sequence[int], image_size: int, channels: int = 3) -> torch.Tensor:
    """Ten crops at ``image_size`` from ``img`` resized to each scale: uint8 (10 * len(scales), C, S, S)."""
    import numpy as np

    img = to_mode(img, channels)
    views: list[torch.Tensor] = []
    for scale in scales:
        arr = np.asarray(resize_shorter(img, scale), dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        views.extend(ten_crops(t, image_size))
    return torch.stack([v.contiguous() for v in views])


def views_per_image(plan: TTAPlan) -> int:
    """Forward passes behind one image's score (``perscale``: per scale, as each scale is scored alone)."""
    if plan.protocol == "perscale":
        return 10
    if plan.protocol == "fullconv":
        return len(plan.scales) * (2 if "flip" in plan.batch_modes else 1)
    base = 10 * len(plan.scales) if plan.scales else 1
    if "translate" in plan.batch_modes:
        base *= 5
    if "diagonal" in plan.batch_modes:
        base *= 3
    if "flip" in plan.batch_modes:
        base *= 2
    return base


def view_weights(modes: Iterable[str], n_views: int) -> list[float]:
    """The weight of each of :func:`tta_views`' views: equal, except that with ``diagonal`` the
    unshifted views (the image and its mirror) carry half the total, as airbench weights them."""
    if "diagonal" not in modes:
        return [1.0 / n_views] * n_views
    per_flip = 3  # the image, then its two diagonal shifts; flip repeats the three mirrored
    return [(0.5 if i % per_flip == 0 else 0.25) / (n_views // per_flip) for i in range(n_views)]


def average_softmax(
    model: Callable[[torch.Tensor], torch.Tensor],
    views: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Softmax over views of the same batch, averaged (or weighted by ``weights``): (B, classes)."""
    weights = weights or [1.0 / len(views)] * len(views)
    total = None
    for v, w in zip(views, weights, strict=True):
        p = model(v).float().softmax(1) * w
        total = p if total is None else total + p
    assert total is not None
    return total


def mode_softmax(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, modes: Sequence[str], size: int
) -> torch.Tensor:
    """The TTA softmax of batch ``x`` under the batch-level ``modes``: their views, weighted."""
    views = tta_views(x, modes, size)
    return average_softmax(model, views, view_weights(modes, len(views)))


def prediction_plan(text: str, image_size: int) -> TTAPlan:
    """A ``--tta`` plan for unlabelled images: the views averaged into one score per image.

    perscale and fullconv are testing protocols of a labelled split (an accuracy per scale);
    a prediction needs one probability per image, which multiscale gives from the same scales.
    """
    plan = parse_tta(text, image_size)
    if plan.protocol != "average":
        average = option("tta", f"multiscale:{','.join(map(str, plan.scales))}")
        raise ClassLabError(
            f"{option_name('tta')} {plan.protocol} scores a labelled split scale by scale "
            f"({spelt('classlab eval --tta', 'classlab.evaluate')}); to predict, average the scales' views: {average}"
        )
    return plan


def views_probabilities(
    score: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, plan: TTAPlan, image_size: int, chunk: int
) -> torch.Tensor:
    """One probability row per image of ``batch`` under ``plan``, at most ``chunk`` views a forward pass.

    ``score`` maps a uint8 batch to probabilities (a model's softmax, an ensemble's mean,
    onnxruntime); ``batch`` is (N, C, S, S), or (N, V, C, S, S) with :func:`image_views` per image.
    """
    flat = batch.flatten(0, 1) if batch.ndim == 5 else batch
    parts = []
    for start in range(0, len(flat), max(1, chunk)):
        views = tta_views(flat[start : start + chunk], plan.batch_modes, image_size)
        weights = view_weights(plan.batch_modes, len(views))
        parts.append(sum(score(v).float() * w for v, w in zip(views, weights)))
    probs = torch.cat(parts)
    return probs.reshape(batch.shape[0], -1, probs.shape[-1]).mean(1) if batch.ndim == 5 else probs


def tta_probabilities_batches(
    model: torch.nn.Module, loader: Iterable, modes: Sequence[str], image_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, labels) over a loader of uint8 batches, with the batch-level modes."""
    outs, labels = eval_loop(model, loader, lambda x: mode_softmax(model, x, modes, image_size))
    return (outs[0] if outs else torch.empty(0, 0)), labels


def test_with_tta(
    model: torch.nn.Module, loader: Iterable, modes: str, image_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain logits, labels, TTA probabilities) in one pass: the first view is the image itself."""
    plan = parse_tta(modes, image_size)
    if plan.scales:
        raise ClassLabError(
            f"trainer.test_tta={modes!r}: only batch-level views (flip, translate, diagonal) at the final test"
        )

    def step(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = tta_views(x, plan.batch_modes, image_size)
        weights = view_weights(plan.batch_modes, len(views))
        plain = model(views[0]).float()
        others = average_softmax(model, views[1:], weights[1:]) if len(views) > 1 else 0.0
        return plain, others + plain.softmax(1) * weights[0]

    (plain, probs), labels = eval_loop(model, loader, step)
    return plain, labels, probs


def tta_probabilities_images(
    model: torch.nn.Module,
    images: Iterable[Image.Image],
    plan: TTAPlan,
    image_size: int,
    channels: int = 3,
    views_per_batch: int = 512,
) -> torch.Tensor:
    """Softmax averaged over the image-level crops (and any batch-level modes) of each original image."""
    crops_per_image = 10 * len(plan.scales)
    group = max(1, views_per_batch // views_per_image(plan))

    def groups() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pending: list[torch.Tensor] = []
        for img in images:
            pending.append(image_views(img, plan.scales, image_size, channels))
            if len(pending) >= group:
                yield torch.cat(pending), torch.zeros(len(pending), dtype=torch.long)
                pending = []
        if pending:
            yield torch.cat(pending), torch.zeros(len(pending), dtype=torch.long)

    def step(crops: torch.Tensor) -> torch.Tensor:
        p = mode_softmax(model, crops, plan.batch_modes, image_size)
        return p.reshape(-1, crops_per_image, p.shape[1]).mean(1)

    outs, _ = eval_loop(model, groups(), step)
    return outs[0] if outs else torch.empty(0, 0)


# ---------------------------------------------------------------------------------------------
# Protocols that score each scale at its own resolution: perscale (the ResNet reproduction
# project) and fullconv (He et al. 2016). The network sees S-pixel inputs, so it must pool
# globally: a cnn or ResNet does, an MLP or a mixer (fixed token count) does not.
# ---------------------------------------------------------------------------------------------


def scale_views(img: Image.Image, scale: int, protocol: str, channels: int = 3) -> torch.Tensor:
    """uint8 views of one image at one scale: ``perscale`` ten S x S crops of the image resized to a
    shorter side of S + 1 (the project's RandomShortestSize(S + 1) + TenCrop(S)); ``fullconv`` the
    whole image resized to a shorter side of S, shape (1, C, H, W)."""
    import numpy as np

    img = to_mode(img, channels)
    arr = np.asarray(resize_shorter(img, scale + 1 if protocol == "perscale" else scale), dtype=np.uint8)
    t = torch.from_numpy((arr[:, :, None] if arr.ndim == 2 else arr).copy()).permute(2, 0, 1)
    if protocol == "perscale":
        return torch.stack([c.contiguous() for c in ten_crops(t, scale)])
    return t.contiguous()[None]


def _probabilities_at(
    model: torch.nn.Module, images: Iterable[Image.Image], scale: int, plan: TTAPlan, channels: int, per_batch: int
) -> torch.Tensor:
    """(N, classes): each image's softmax at ``scale``, averaged over its views there."""
    k = 10 if plan.protocol == "perscale" else 1
    mirror = ("flip",) if plan.protocol == "fullconv" and "flip" in plan.batch_modes else ()

    def groups() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pending: list[torch.Tensor] = []
        for img in images:
            views = scale_views(img, scale, plan.protocol, channels)
            if pending and (views.shape[1:] != pending[0].shape[1:] or len(pending) * k >= per_batch):
                yield torch.cat(pending), torch.zeros(len(pending), dtype=torch.long)
                pending = []
            pending.append(views)  # images of another shape (fullconv, non-square data) start a new batch
        if pending:
            yield torch.cat(pending), torch.zeros(len(pending), dtype=torch.long)

    def step(views: torch.Tensor) -> torch.Tensor:
        p = average_softmax(model, tta_views(views, mirror))
        return p.reshape(-1, k, p.shape[1]).mean(1)

    outs, _ = eval_loop(model, groups(), step)
    return outs[0] if outs else torch.empty(0, 0)


def scale_protocol_probabilities(
    model: torch.nn.Module,
    images: Callable[[], Iterable[Image.Image]],
    plan: TTAPlan,
    channels: int = 3,
    views_per_batch: int = 256,
) -> list[torch.Tensor]:
    """One (N, classes) softmax per scale of ``plan`` (``images()`` gives the originals afresh each time)."""
    out = []
    for scale in plan.scales:
        try:
            out.append(_probabilities_at(model, images(), scale, plan, channels, views_per_batch))
        except RuntimeError as exc:
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise ClassLabError(
                f"{option_name('tta')} {plan.protocol}: the model cannot score {scale} px inputs ({first}); these "
                "protocols need a "
                "network that pools globally (cnn, resnet_cifar, ...; not mlp or a mixer) and channel normalisation"
            ) from None
    return out


def scale_protocol_metrics(
    per_scale: Sequence[torch.Tensor], labels: torch.Tensor, plan: TTAPlan, k5: int
) -> tuple[dict[str, object], torch.Tensor]:
    """The figures of a ``perscale`` / ``fullconv`` plan and the probabilities a report should use.

    ``perscale`` reports each scale's accuracy and their mean, as the ResNet reproduction project's
    table did (its "Avg Top-1"): no views are averaged across scales. ``fullconv`` averages the
    softmax over the scales (He et al.: "average the scores at multiple scales") and reports that
    one figure; each scale's own accuracy is listed beside it.
    """
    rows = [
        {"scale": s, "top1": top_k_accuracy(p, labels, 1), "top5": top_k_accuracy(p, labels, k5)}
        for s, p in zip(plan.scales, per_scale)
    ]
    mean_probs = torch.stack(list(per_scale)).mean(0)
    if plan.protocol == "perscale":
        top1 = sum(r["top1"] for r in rows) / len(rows)
        top5 = sum(r["top5"] for r in rows) / len(rows)
    else:
        top1, top5 = top_k_accuracy(mean_probs, labels, 1), top_k_accuracy(mean_probs, labels, k5)
    figures: dict[str, object] = {
        "modes": plan.text,
        "protocol": plan.protocol,
        "views": views_per_image(plan),
        "scales": list(plan.scales),
        "per_scale": rows,
        "top1": top1,
        "top5": top5,
    }
    return figures, mean_probs
