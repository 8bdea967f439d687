"""A trained run back in memory: ``classlab.load(run)``.

Everything is rebuilt from the run folder alone (config.yaml, classes.json, a checkpoint), and
images go through the very preprocessing training used (``data.preprocess``), so a prediction
here matches what validation measured. eval, predict and export all start here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from classlab.config import Config, saved_tree, validate
from classlab.data.preprocess import BadImage, Normalize, array_to_tensor, image_to_tensor, open_image, upright
from classlab.data.tasks import read_layout
from classlab.engine.calibration import calibration_in_use, calibration_note
from classlab.engine.predict import probabilities, task_probabilities
from classlab.errors import ClassLabError, command
from classlab.models import build_model
from classlab.models.multitask import build_multitask_net
from classlab.models.net import ClassifierModel
from classlab.run import RunFolder, open_run_at, safe_torch_load


def rotation_note(where: object, run: object = None) -> str:
    """What a rotation pretext run's predictions mean, said wherever one is predicted or exported: its classes are
    angles, which a user who meant its classifier would otherwise take for class names. ``run``: the run folder to
    train a classifier from (None for an exported file, whose folder may be elsewhere)."""
    return (
        f"note: {where} is a rotation pretext model: its class is the quarter turn each image shows (degrees "
        f"anticlockwise from upright; turn it back clockwise by that); to classify images, train from its run: "
        f"classlab train model.init_from={run or 'RUN'}"
    )


class LoadedRun:
    """A trained model with its class names and preprocessing: call it on images.

    For a multitask run ``classes`` are the combined classes and ``tasks`` the TaskLayout.
    """

    tasks: Any = None
    checkpoint: str = "best"  # the checkpoint the weights came from (the run's file name, without .ckpt)
    calibration: dict[str, Any] | None = None  # the calibration record whose T the model's logits are divided by
    calibration_note: str | None = None  # the one line that says so ("probabilities calibrated: T=1.83 (...)")

    def __init__(
        self, run: RunFolder, cfg: Config, model: ClassifierModel, classes: list[str], size: int, channels: int
    ):
        self.run, self.cfg, self.model, self.classes = run, cfg, model, classes
        self.image_size, self.channels = size, channels
        self.max_image_pixels = cfg.data.max_image_pixels if cfg is not None else None

    @property
    def temperature(self) -> float | None:
        """The calibration's T (``classlab eval --calibrate``) the probabilities are calibrated by, or None."""
        return float(self.calibration["temperature"]) if self.calibration else None

    @property
    def task(self) -> str:
        """What the model predicts: 'classify', 'multitask', or 'rotation' (a pretext run: how far each image
        is turned from upright, its classes the angles in degrees anticlockwise)."""
        return self.cfg.task if self.cfg is not None else "classify"

    def to_tensor(self, image: Any) -> torch.Tensor:
        """PIL image, HW/HWC/CHW array or tensor, a file path or an encoded file's bytes -> the uint8 tensor the
        model takes. Anything else is one ClassLabError saying what is accepted, never numpy's or PIL's own."""
        if isinstance(image, (str, Path, bytes)):  # an unreadable file: BadImage, a row's error in predict
            return image_to_tensor(self._open(image), self.image_size, self.channels)
        if isinstance(image, Image.Image):  # Image.open's result keeps its EXIF turn: apply it, as files get it
            return image_to_tensor(upright(image), self.image_size, self.channels)
        if isinstance(image, (np.ndarray, torch.Tensor)):
            return array_to_tensor(image_pixels(image), self.image_size, self.channels)
        raise ClassLabError(f"a value of type '{type(image).__name__}' is not an image; {ACCEPTED}")

    def _open(self, source: str | Path | bytes) -> Image.Image:
        if not isinstance(source, bytes) and not Path(source).is_file():
            what = "is a folder" if Path(source).is_dir() else "does not exist"
            raise ClassLabError(f"'{source}' {what}; give an image file (classlab.predict reads folders)")
        return open_image(source, self.image_size, self.max_image_pixels)

    def _model_input(self, image: Any) -> torch.Tensor:
        """``to_tensor`` for a caller's image: an unreadable file is a ClassLabError naming it."""
        try:
            return self.to_tensor(image)
        except BadImage as exc:
            raise ClassLabError(f"{'the bytes given' if isinstance(image, bytes) else image}: {exc}") from None

    def _batch(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        shape = (self.channels, self.image_size, self.image_size)
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and tuple(images.shape[1:]) == shape:
            return images  # already what the model takes: a batch of this run's size and channels
        if isinstance(images, Iterator):
            images = list(images)
        if len(images) == 0:
            return torch.empty((0, *shape), dtype=torch.uint8)
        return torch.stack([self._model_input(i) for i in images])

    def probabilities(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """Softmax probabilities, one row an image (no images: zero rows)."""
        batch = self._batch(images)
        if len(batch) == 0:
            return torch.empty((0, len(self.classes)))
        return probabilities(self.model, batch)

    def task_probabilities(self, images: Sequence[Any] | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Multitask runs: (combined probabilities, each task's probabilities) of the images."""
        if self.tasks is None:
            raise ClassLabError(f"run '{self.run.path}' is not a multitask run; use probabilities()")
        return task_probabilities(self.model, self._batch(images))

    def __call__(self, images: Any) -> tuple[str, float] | list[tuple[str, float]]:
        """One image -> (class name, probability) of its top class; a list, a generator, or an N-image array or
        tensor (NCHW / NHWC) -> a list of them, empty for no images."""
        if isinstance(images, Iterator):
            images = list(images)
        stacked = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        many = stacked or isinstance(images, (list, tuple))
        if many and len(images) == 0:
            return []
        probs = self.probabilities(images if many else [images])
        top = probs.max(1)
        out = [(self.classes[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
        return out if many else out[0]


ACCEPTED = (
    "give a PIL image, a file path, an encoded file's bytes, an HW / HWC / CHW array or tensor "
    "(uint8, or float in 0..1 or 0..255), or a list of them"
)


def image_pixels(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An in-memory image checked as pixels: a shape that is an image, finite values, and not normalised already.

    Pixels below 0 or NaN were clipped to black without a word: a tensor already normalised by the user's
    own transform (mean/std) gave confident wrong classes. The run normalises with its own statistics.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()  # a tensor on a GPU, or one needing grad
        values = (image.float() if image.dtype in (torch.bfloat16, torch.float16) else image).numpy()
    else:
        values = np.asarray(image)
    shape = tuple(values.shape)
    no_channels = len(shape) == 3 and min(shape[0], shape[-1]) > 4  # neither HWC nor CHW
    if values.dtype.kind not in "biuf" or len(shape) not in (2, 3) or 0 in shape or no_channels:
        raise ClassLabError(f"an array of shape {shape} ({values.dtype}) is not an image; {ACCEPTED}")
    if values.dtype.kind == "f":
        if not np.isfinite(values).all():
            raise ClassLabError("the image array holds NaN or infinite values; give pixels (0..1 or 0..255)")
        if values.min() < -0.05:  # a resize's overshoot (-0.01) is clipped; a normalised image reaches -2
            raise ClassLabError(
                f"the image array has values below 0 (from {values.min():.3g} to {values.max():.3g}), as an image "
                "normalised with a mean and std has; give the pixels before normalising (uint8, or float in 0..1 "
                "or 0..255): the run normalises them with its own statistics"
            )
    return values


def load(
    run: str | Path | RunFolder, checkpoint: str | None = None, device: str = "cpu", calibrated: bool = True
) -> LoadedRun:
    """Rebuild a run's model from its folder, or from one of its checkpoint files (weights only, no code executed).

    ``checkpoint``: best, last, epochN; None: best, or the file ``run`` names. ``device``: where the model runs
    (``cpu``, ``cuda``, ``cuda:1``, ``mps``); a device torch cannot use here is refused before anything is read.
    ``calibrated``: a classifier with a calibration fitted for this checkpoint (``eval --calibrate``) gives its
    calibrated probabilities; False gives the plain softmax (what the temperature is fitted on)."""
    check_run_given(run)
    device = _usable_device(device)
    run, checkpoint = open_run_at(run, checkpoint)
    cfg = validate(saved_tree(run.read_config_tree()), saved=True)
    classes = run.read_classes()
    ckpt = safe_torch_load(run.checkpoint(checkpoint))
    meta = ckpt.get("classlab", {})
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or "model.normalize.mean" not in state:
        raise ClassLabError(f"{run.checkpoint(checkpoint)} is not a classlab checkpoint (no model weights found)")
    size = int(meta.get("image_size") or cfg.data.image_size or 32)
    channels = int(meta.get("channels") or 3)
    num_classes = len(classes)
    spec = cfg.model.spec()
    for key in ("init_from", "pretrained", "pretrained_path", "weights"):
        spec.pop(key, None)  # the checkpoint holds the weights; the source may be gone
    layout = None
    if cfg.task == "multitask":
        layout = read_layout(run)
        net = build_multitask_net(spec, layout, channels, size)
    else:
        net = build_model(spec, num_classes, channels, size)
    mean, std = state["model.normalize.mean"], state["model.normalize.std"]
    model = ClassifierModel(Normalize(mean.clone(), std.clone()), net)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise ClassLabError(_misfit(run, checkpoint, meta, classes, cfg.task, model, weights)) from None
    model.eval().to(device)
    loaded = LoadedRun(run, cfg, model, classes, size, channels)
    loaded.tasks = layout
    loaded.checkpoint = checkpoint
    if calibrated and cfg.task == "classify":
        loaded.calibration = calibration_in_use(run, checkpoint)
        if loaded.calibration is not None:
            model.temperature = loaded.temperature
            loaded.calibration_note = calibration_note(loaded.calibration)
    return loaded


def check_run_given(run: object) -> None:
    """A run given as something that can name one, or one line: None (a notebook cell's train that failed) or a
    number raised pathlib's TypeError from deep inside the loader."""
    if not isinstance(run, (str, Path, RunFolder)):
        export = command("classlab export", "classlab.export")
        raise ClassLabError(
            f"a value of type '{type(run).__name__}' is not a run; give the run folder (what classlab.train "
            f"returns), one of its checkpoint files, or a model.onnx written by {export}"
        )


def _usable_device(device: str | torch.device) -> torch.device:
    """The device asked for, or one line: torch's own errors were a list of twenty device types for a typo
    (``gpu``) and a note about NVIDIA drivers, raised only after the checkpoint was read."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise ClassLabError(f"device '{device}' is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    usable = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(found.type, lambda: True)
    if not usable():
        raise ClassLabError(f"device '{device}' is not available on this machine (torch sees none); use device='cpu'")
    return found


def _misfit(
    run: RunFolder,
    checkpoint: str,
    meta: dict[str, Any],
    classes: list[str],
    task: str,
    model: torch.nn.Module,
    weights: dict[str, torch.Tensor],
) -> str:
    """Why a checkpoint's weights do not fit the run's model, in one line.

    torch's own message is a multi-line list whose first line says nothing; the usual cause is a
    checkpoint copied from another run, which its saved task and classes show.
    """
    path = run.checkpoint(checkpoint)
    theirs = meta.get("classes")
    if isinstance(theirs, list) and (theirs != classes or meta.get("task", task) != task):
        shown = ", ".join(map(str, theirs[:4])) + (", ..." if len(theirs) > 4 else "")
        return (
            f"{path} comes from another run: a {meta.get('task', 'classify')} run with {len(theirs)} classes "
            f"({shown}), while '{run.path}' is a {task} run with {len(classes)}; give the run folder that "
            "wrote it, or that run's checkpoint file"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if shapes:
        key = shapes[0]
        problem = f"{key} is {list(weights[key].shape)} in it, {list(own[key].shape)} in the model"
    elif missing:
        problem = f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more tensors" if len(missing) > 1 else "")
    else:
        problem = f"it has {extra[0]} the model lacks" if extra else "its tensors differ"
    return (
        f"{path} does not fit the model of '{run.path}' ({problem}); it was written by another run or another "
        "classlab version: give the run folder that wrote it"
    )
