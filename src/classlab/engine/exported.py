"""An exported ONNX file used as a trained run: predict with the very file that will be deployed.

``classlab export`` writes the class names, the input size and the channels into the file, and
the model carries its own normalisation, so the file alone is enough to predict: decode, resize
the shorter side, centre-crop (``data.preprocess``, the one path training used) and run it in
onnxruntime. Predicting with the file, not the run, is how a user checks what they ship (after a
quantisation, on another machine, without the run folder) against what the run measured.

Loading an ONNX file never executes code: onnxruntime reads a graph of operators.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from classlab.data.tasks import TaskLayout
from classlab.engine.load import LoadedRun
from classlab.errors import ClassLabError, command, option, option_name

INSTALL_HINT = "pip install 'classlab[export]'"
ONNX_SUFFIX = ".onnx"
EXPORT_SUFFIXES = (ONNX_SUFFIX, ".pt2")
TEMPERATURE_KEY = "classlab.temperature"  # metadata: the calibration T baked into the logits (absent: none)


def is_exported_file(path: str | Path) -> bool:
    """A file named like an export (``.onnx``, ``.pt2``): given where a run is expected, it stands for one."""
    return Path(path).suffix.lower() in EXPORT_SUFFIXES and not Path(path).is_dir()


def _run_named_in(path: str | Path) -> str | None:
    """The run folder an exported ONNX file's metadata says it came from, when that folder is still there."""
    source = None
    if Path(path).suffix.lower() == ONNX_SUFFIX:
        try:
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            source = meta.get("classlab.run")
        except Exception:  # noqa: BLE001 - no onnx package, or not a readable file: the line says less
            source = None
    return source if source and Path(source).is_dir() else None


def not_a_run(path: str | Path, verb: str) -> ClassLabError:
    """``verb`` needs a run folder (its config, splits and checkpoints), and an exported file has none: the
    refusal names the folder the file was exported from, when its metadata still says, and what the file alone
    can do. It was told it was 'a file, not a run folder' and pointed at classlab train."""
    source = _run_named_in(path)
    origin = f"give the run folder it was exported from{f' ({source})' if source else ''}"
    alone = command("classlab predict FILE IMAGES", "classlab.predict(FILE, IMAGES)")
    return ClassLabError(
        f"'{path}' is an exported model: {verb} reads a run folder (its config, splits and checkpoints); {origin}, "
        f"or score images with the file alone: {alone}"
    )


def exported_for_eval(path: str | Path, data: object, checkpoint: str | None, calibrate: bool) -> ExportedRun:
    """``classlab eval FILE.onnx --data FOLDER``: the file as predict runs it, once what it cannot do is refused.

    The file holds no images, so there is no split to evaluate without ``--data``; it is one checkpoint, and a
    temperature is fitted on a run's validation images, which the file has none of."""
    if data is None:
        source = _run_named_in(path)
        raise ClassLabError(
            f"'{path}' is an exported model: it holds no test or validation images to evaluate; give labelled images "
            f"with {option('data', metavar='FOLDER')} (class folders or a CSV manifest), or evaluate the run folder "
            f"it was exported from{f' ({source})' if source else ''}"
        )
    if checkpoint not in (None, "best"):
        raise ClassLabError(
            f"{path} is one exported model: drop {option('checkpoint', checkpoint)}, "
            "or give the run folder to pick its checkpoint"
        )
    if calibrate:
        fit = command("classlab eval RUN --calibrate", "classlab.evaluate(RUN, calibrate=True)")
        raise ClassLabError(
            f"{option_name('calibrate')} fits a temperature on a run's validation images, and {path} has none: "
            f"calibrate the run it was exported from ({fit}), then export it again"
        )
    loaded = ExportedRun(path, verb="eval")
    if loaded.task != "classify":
        raise ClassLabError(
            f"{option('data')} scores a classifier; {path} is a {loaded.task} model: evaluate the run it was exported "
            "from on its own split"
        )
    return loaded


class OnnxModel:
    """An exported ONNX file run by onnxruntime: float [0, 1] NCHW in, logits out."""

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ClassLabError(f"{option('backend', 'onnx')} needs onnxruntime: {INSTALL_HINT}") from None
        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - a damaged file should be one line, not a traceback
            raise ClassLabError(f"{path} is not a usable ONNX model ({str(exc).splitlines()[0][:160]})") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.classes: list[str] = json.loads(self.metadata.get("classlab.classes", "[]"))
        self.input_name = self.session.get_inputs()[0].name

    def outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """uint8 or [0, 1] float NCHW batch -> every output: the logits, then a multitask run's task logits."""
        x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
        return [torch.from_numpy(out) for out in self.session.run(None, {self.input_name: x.contiguous().numpy()})]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float NCHW batch -> logits."""
        return self.outputs(images)[0]


class ExportedRun(LoadedRun):
    """An ONNX file written by ``classlab export``, looking like a loaded run to predict and the submission writer.

    It has no run folder, config or PyTorch model: ``run``, ``cfg`` and ``model`` are None, and
    images are read with the default pixel limit (``data.max_image_pixels``'s default).
    """

    def __init__(self, path: str | Path, calibrated: bool = True, verb: str = "predict") -> None:
        path = Path(path)
        if not path.is_file():
            written = command("classlab export", "classlab.export")
            raise ClassLabError(f"'{path}' does not exist; give a run folder or a file written by {written}")
        if path.suffix.lower() != ONNX_SUFFIX:
            onnx = command("classlab export RUN --format onnx", "classlab.export(RUN, fmt='onnx')")
            raise ClassLabError(
                f"'{path}' is a {path.suffix} export; {verb} runs .onnx files ({onnx}) or the run folder itself"
            )
        self.onnx = OnnxModel(path)
        meta = self.onnx.metadata
        if not self.onnx.classes or "classlab.image_size" not in meta:
            raise ClassLabError(
                f"{path} was not written by {command('classlab export', 'classlab.export')} (no class names or input "
                f"size in its metadata); export the run again: {command('classlab export RUN', 'classlab.export(RUN)')}"
            )
        size, channels = int(meta["classlab.image_size"]), int(meta.get("classlab.channels", "3"))
        super().__init__(None, None, None, self.onnx.classes, size, channels)  # type: ignore[arg-type]
        self.path = path
        self.max_image_pixels = None
        if "classlab.tasks" in meta:  # a multitask run: its file predicts each task as the run does
            self.tasks = TaskLayout.from_json(json.loads(meta["classlab.tasks"]))
        # A calibrated run's T is baked into the file's logits (classlab export); calibrated=False undoes it.
        baked = float(meta[TEMPERATURE_KEY]) if TEMPERATURE_KEY in meta else None
        self.undo = baked if baked is not None and not calibrated else 1.0
        if baked is not None and calibrated:
            self.calibration = {"temperature": baked, "file": str(path)}
            self.calibration_note = f"probabilities calibrated: T={baked:.4g} (baked into {path.name} at export)"

    @property
    def task(self) -> str:
        return self.onnx.metadata.get("classlab.task", "multitask" if self.tasks is not None else "classify")

    def probabilities(self, images: object) -> torch.Tensor:
        return (self.onnx.logits(self._batch(images)) * self.undo).softmax(1)  # type: ignore[arg-type]

    def task_probabilities(self, images: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.tasks is None:
            raise ClassLabError(f"{self.path} is not a multitask model; use probabilities()")
        outs = self.onnx.outputs(self._batch(images))  # type: ignore[arg-type]
        return outs[0].softmax(1), [out.softmax(1) for out in outs[1:]]
