"""The Python API as a notebook uses it: what classlab.load takes, what classlab.predict takes, train's
arguments, and a process left as train found it."""

from __future__ import annotations

import inspect
import json
import logging
import os
import pydoc
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import classlab
from classlab.errors import ClassLabError, ConfigError
from tests.conftest import make_image


@pytest.fixture(scope="module")
def model(tiny_run: Path) -> classlab.engine.load.LoadedRun:
    return classlab.load(tiny_run)


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_every_in_memory_layout_of_one_image_predicts_the_same(model, tmp_path: Path) -> None:
    hwc = _image()
    expected = model(hwc)
    chw = torch.from_numpy(hwc).permute(2, 0, 1)
    as_float = chw.float() / 255
    path = tmp_path / "x.png"
    Image.fromarray(hwc).save(path)
    assert model(chw.numpy()) == expected  # a tensor's .numpy(): numpy's Image.fromarray refused (3, 32, 32)
    assert model(path) == model(path.read_bytes()) == expected  # PNG is lossless
    probs = model.probabilities([hwc])
    assert torch.equal(model.probabilities([as_float.requires_grad_()]), probs)  # "Can't call numpy() on ... grad"
    bf16 = model.probabilities([as_float.bfloat16()])  # numpy has no bfloat16: "Got unsupported ScalarType"
    assert torch.allclose(bf16, probs, atol=0.01)
    batch = np.stack([hwc, hwc[::-1]])
    assert model(batch) == [expected, model(hwc[::-1])]  # an NHWC array is N images, as an NCHW tensor is
    assert model(img for img in batch) == model(list(batch))
    assert model([]) == [] and model.probabilities([]).shape == (0, len(model.classes))


def test_a_batch_tensor_of_another_shape_goes_through_preprocessing(model) -> None:
    """A uint8 batch went to the net as it was when only its width matched the run's size: uncropped, or a
    grey batch into a colour net (a conv error from deep inside torch)."""
    tall = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 48, 32), dtype=np.uint8))
    centre = tall[:, :, 8:40, :]  # the shorter side is 32 already: preprocessing takes the centre square
    assert torch.equal(model.probabilities(tall), model.probabilities(centre))
    grey = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 1, 32, 32), dtype=np.uint8))
    assert torch.equal(model.probabilities(grey), model.probabilities(grey.expand(-1, 3, -1, -1).contiguous()))


def test_what_is_not_an_image_is_one_line_saying_what_is(model, tmp_path: Path) -> None:
    accepted = (
        "give a PIL image, a file path, an encoded file's bytes, an HW / HWC / CHW array or tensor (uint8, or float "
        "in 0..1 or 0..255), or a list of them"
    )
    with pytest.raises(ClassLabError) as info:
        model(None)
    assert str(info.value) == f"a value of type 'NoneType' is not an image; {accepted}"
    with pytest.raises(ClassLabError) as info:
        model(np.zeros((0, 0, 3), np.uint8))
    assert str(info.value) == f"an array of shape (0, 0, 3) (uint8) is not an image; {accepted}"
    with pytest.raises(ClassLabError) as info:
        model(tmp_path / "nope.png")
    missing = tmp_path / "nope.png"
    assert str(info.value) == f"'{missing}' does not exist; give an image file (classlab.predict reads folders)"
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ClassLabError, match=r"notes.png: not an image PIL can read$"):
        model(tmp_path / "notes.png")
    with pytest.raises(ClassLabError, match=r"^the image array holds NaN or infinite values"):
        model(np.full((32, 32, 3), np.nan))


def test_an_image_already_normalised_is_refused_not_clipped_to_black(model) -> None:
    """torchvision's Normalize output was clipped to 0..1 and gave a confident class of a mostly black image."""
    normalised = (torch.rand(3, 32, 32) - torch.tensor([0.49, 0.48, 0.45])[:, None, None]) / 0.25
    with pytest.raises(ClassLabError) as info:
        model(normalised)
    assert str(info.value).startswith("the image array has values below 0 (from -")
    assert str(info.value).endswith(
        "give the pixels before normalising (uint8, or float in 0..1 or 0..255): the run normalises them with its "
        "own statistics"
    )


def test_load_refuses_a_non_run_and_a_device_it_cannot_use(tiny_run: Path) -> None:
    with pytest.raises(ClassLabError) as info:
        classlab.load(None)
    assert str(info.value) == (
        "a value of type 'NoneType' is not a run; give the run folder (what classlab.train returns), one of its "
        "checkpoint files, or a model.onnx written by classlab.export"
    )
    photo = tiny_run.parent / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    with pytest.raises(ClassLabError) as info:
        classlab.load(photo)  # said "run folder 'photo.png' not found" of a file that is there
    assert str(info.value) == (
        f"'{photo}' is a file, not a run folder; give the folder classlab.train returned (the images to classify "
        "come after it: classlab.predict(RUN, IMAGES), or classlab.load(RUN)(image))"
    )
    with pytest.raises(ClassLabError) as info:
        classlab.load(tiny_run, device="gpu")
    assert str(info.value) == "device 'gpu' is not a torch device; use 'cpu', 'cuda', 'cuda:1' or 'mps'"
    if not torch.cuda.is_available():
        with pytest.raises(ClassLabError, match=r"^device 'cuda' is not available on this machine"):
            classlab.load(tiny_run, device="cuda")


def test_predict_takes_one_folder_alone_and_names_images_in_memory(tiny_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    make_image(folder / "a.png", (200, 30, 30), size=40)
    make_image(folder / "b.png", (30, 30, 200), size=40)
    listed = [r["class"] for r in classlab.predict(tiny_run, [folder])]
    assert len(listed) == 2
    assert [r["class"] for r in classlab.predict(tiny_run, str(folder))] == listed  # was "'/' does not exist"
    assert [r["class"] for r in classlab.predict(tiny_run, folder)] == listed  # was "'PosixPath' is not iterable"
    with pytest.raises(ClassLabError) as info:
        classlab.predict(tiny_run, [Image.new("RGB", (32, 32))])
    assert str(info.value) == (
        "classlab.predict reads image files and folders, and was given a value of type 'Image'; predict images in "
        "memory with classlab.load(run)(images)"
    )


def test_help_and_signature_show_the_function(tiny_run: Path) -> None:
    """classlab.train is a module that calls like its function: help() showed the module's helpers and
    inspect.signature (a notebook's tab completion) ``(*args, **kwargs)``."""
    for verb in ("train", "evaluate", "predict"):
        function = getattr(getattr(classlab, verb), verb)
        assert inspect.signature(getattr(classlab, verb)) == inspect.signature(function)
    page = pydoc.render_doc(classlab.train, renderer=pydoc.plaintext)
    assert "train(config: 'Config | str | Path | dict | None' = None, overrides:" in page
    assert '``overrides``: ``["optim.lr=0.05", "epochs=3"]``' in page


def test_train_config_type_and_override_shapes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        classlab.train(5)
    assert str(info.value) == (
        "config is a value of type 'int'; give a YAML or INI file's path, a dict, a Config, or None for the defaults"
    )
    with pytest.raises(ConfigError) as info:
        classlab.train(None, ["epochs=1", 3])
    assert str(info.value) == (
        "override 3 is a value of type 'int'; give overrides as 'key=value' strings (['epochs=3']) or as a dict "
        "({'epochs': 3})"
    )
    from classlab.train import coerce_config

    assert coerce_config(None, "epochs=7").epochs == 7  # was "override 'e' is not of the form key=value"
    cfg = coerce_config(None, {"model.layers": [16, "p"], "data.images_per_class": None, "aug.flip": False})
    assert (cfg.model.layers, cfg.data.images_per_class, cfg.aug.flip) == ([16, "p"], None, False)


def test_train_leaves_the_process_as_it_found_it(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Seeds, deterministic mode, thread count and environment variables were the run's after it ended; quiet=True
    still printed Lightning's device report, its tips and its deprecation warnings."""
    import classlab.train  # noqa: F401  (importing it the first time draws from random: not the run's doing)

    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    threads, env = torch.get_num_threads(), dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()  # an earlier test in the process may have set it
    torch.use_deterministic_algorithms(False)  # the opposite of what a run sets
    lightning_level = logging.getLogger("lightning.pytorch").level
    capfd.readouterr()
    overrides = {
        "run.root": tmp_path / "runs",
        "exp_name": "api",
        "data.cache_dir": tmp_path / "cache",
        "data.images_per_class": 20,
        "model.layers": [16, "p", 32, "p"],
        "epochs": 1,
        "trainer.progress": False,
        "trainer.threads": 1,
    }
    run = classlab.train(None, overrides, quiet=True)  # a dict of overrides, Paths and lists as they are
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert json.loads((run.path / "summary.json").read_text())["status"] == "finished"
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    assert not torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    assert torch.get_num_threads() == threads
    assert dict(os.environ) == env  # CLASSLAB_RUN_DIR, PL_GLOBAL_SEED, PL_SEED_WORKERS were left set
    assert logging.getLogger("lightning.pytorch").level == lightning_level


def test_figures_leave_the_callers_matplotlib_backend(tmp_path: Path) -> None:
    """evaluate and report switched the process to Agg: a notebook's inline plots stopped showing."""
    import matplotlib

    from classlab.run import atomic_write_figure, new_figure

    prior = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        fig, ax = new_figure(figsize=(2, 2))
        ax.plot([0, 1], [1, 0])
        fig.tight_layout()
        atomic_write_figure(tmp_path / "f.png", fig)
        assert matplotlib.get_backend() == "svg"
        assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(tmp_path / "f.png").size == (200, 200)
    finally:
        matplotlib.use(prior)


# ---------------------------------------------------------------------------------------------
# Hints in the caller's words: keywords from Python, flags on the command line


def _finished_run(root: Path, name: str) -> Path:
    """A run folder that exists and says it finished: train refuses to start over it before anything loads."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"status": "finished"}')
    return folder


def test_train_names_resume_and_force_as_keywords_from_python_and_as_flags_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """classlab.train said 'use --resume ... --force ...' to a caller who has resume=True and force=True."""
    from tests.faults import cli

    folder = _finished_run(tmp_path / "runs", "done")
    overrides = [f"run.root={tmp_path / 'runs'}", "exp_name=done"]
    with pytest.raises(ClassLabError) as info:
        classlab.train(None, overrides)
    assert str(info.value) == (
        f"run folder '{folder}' already exists and has finished; use resume=True with more epochs to train it on, "
        "force=True to move it aside, or choose another exp_name"
    )
    with pytest.raises(ClassLabError) as info:
        classlab.train(None, [f"run.root={tmp_path / 'runs'}", "exp_name=none"], resume=True)
    missing = tmp_path / "runs" / "none"
    assert str(info.value) == f"resume=True: run folder '{missing}' does not exist; start it without resume=True"
    code, _, err = cli(capsys, "train", *overrides)
    assert code == 1 and err == (
        f"error: run folder '{folder}' already exists and has finished; use --resume with more epochs to train it "
        "on, --force to move it aside, or choose another exp_name\n"
    )


def test_options_with_values_are_keywords_in_python(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--tta, --data and --checkpoint with their values: tta / data='...' / checkpoint='last' from Python."""
    from tests.faults import cli

    missing = tiny_run.parent / "nope"
    with pytest.raises(ClassLabError) as info:
        classlab.evaluate(tiny_run, data=missing)
    assert str(info.value).startswith(f"data='{missing}' does not exist; give labelled images")
    with pytest.raises(ClassLabError) as info:
        classlab.evaluate(tiny_run, tta="flip,flip")
    assert str(info.value) == "tta flip is given twice in 'flip,flip': give each mode once"
    with pytest.raises(ClassLabError) as info:
        classlab.load(tiny_run.parent / "model.onnx", "last")
    assert "is one exported model: drop checkpoint='last', or give the run folder" in str(info.value)
    code, _, err = cli(capsys, "eval", str(tiny_run), "--data", str(missing))
    assert code == 1 and err.startswith(f"error: --data '{missing}' does not exist; give labelled images")
    code, _, err = cli(capsys, "eval", str(tiny_run), "--tta", "flip,flip")
    assert code == 1 and err == "error: --tta flip is given twice in 'flip,flip': give each mode once\n"


def test_a_hint_with_no_keyword_is_said_as_python_does_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ensemble mean has no keyword: a Python caller gives the runs as a list."""
    from tests.faults import cli

    for name in ("lr=0.1", "lr=0.01"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "config.yaml").write_text("exp_name: x\n")
    with pytest.raises(ClassLabError) as info:
        classlab.export(tmp_path / "sweep")
    assert str(info.value).endswith("or for predict/eval several of them as a list")
    code, _, err = cli(capsys, "export", str(tmp_path / "sweep"))
    assert code == 1 and err.rstrip().endswith("or for predict/eval several of them with --ensemble mean")


def test_a_hint_naming_a_command_names_the_call_or_says_it_is_for_a_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'listed by `classlab train --print-config`', 'give the folder `classlab train` printed': a command to a caller
    who has a call for it; 'run `classlab models`', which has none, is said to be a shell command."""
    from tests.faults import cli

    def python_and_command_line(call: object, *command: str) -> tuple[str, str]:
        with pytest.raises(ClassLabError) as info:
            call()
        code, _, err = cli(capsys, *command)
        assert code in (1, 2), err
        return str(info.value), err.removeprefix("error: ").rstrip("\n")

    said, line = python_and_command_line(lambda: classlab.train(None, ["optim.lrr=1"]), "train", "optim.lrr=1")
    assert said.endswith("valid keys of 'optim' are listed by print(classlab.train.print_config(None))")
    assert line.endswith("valid keys of 'optim' are listed by `classlab train --print-config`")
    typo = "model.name=resnt"
    said, line = python_and_command_line(lambda: classlab.train(None, [typo]), "train", typo)
    assert "run the shell command `classlab models` for the list, or use timm:<name>" in said
    assert "run `classlab models` for the list, or use timm:<name>" in line
    missing = tmp_path / "nope"
    said, line = python_and_command_line(lambda: classlab.evaluate(missing), "eval", str(missing))
    assert said == f"run folder '{missing}' not found; classlab.train returns the folder it made"
    assert line == f"run folder '{missing}' not found; `classlab train` prints the folder it made"
    photo = tmp_path / "photos" / "cat" / "0.png"
    photo.parent.mkdir(parents=True)
    Image.fromarray(_image()).save(photo)
    said, line = python_and_command_line(lambda: classlab.evaluate(photo), "eval", str(photo))
    assert said.endswith(
        "give the folder classlab.train returned (the images to classify come after it: classlab.predict(RUN, IMAGES), "
        "or classlab.load(RUN)(image))"
    )
    assert line.endswith(
        "give the folder `classlab train` printed (the images to classify come after it: classlab predict RUN IMAGES, "
        "or classlab.load(RUN)(image))"
    )
    said, line = python_and_command_line(lambda: classlab.train(photo), "train", str(photo))
    root = tmp_path / "photos"
    assert said == f"'{photo}' is an image, not a config file; to train on its folder of class folders: " + (
        f"classlab.train(None, ['data.root={root}'])"
    )
    assert line == f"'{photo}' is an image, not a config file; to train on its folder of class folders: " + (
        f"classlab train data.root={root}"
    )
    exported = tmp_path / "model.pt2"  # an export predict cannot run: the call that writes one it can
    exported.write_bytes(b"not read")
    said, line = python_and_command_line(
        lambda: classlab.predict(exported, [photo]), "predict", str(exported), str(photo)
    )
    assert said.endswith("predict runs .onnx files (classlab.export(RUN, fmt='onnx')) or the run folder itself")
    assert line.endswith("predict runs .onnx files (classlab export RUN --format onnx) or the run folder itself")


def _ctrl_c_at_second_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C that lands while the second training batch runs, as a user's in a terminal or a notebook would."""
    import signal

    from classlab.engine.callbacks import GracefulStop

    at_batch_end = GracefulStop.on_train_batch_end

    def ctrl_c(self: GracefulStop, trainer: object, module: object, outputs: object, batch: object, i: int) -> None:
        if i == 1:
            os.kill(os.getpid(), signal.SIGINT)
        at_batch_end(self, trainer, module, outputs, batch, i)

    monkeypatch.setattr(GracefulStop, "on_train_batch_end", ctrl_c)


@pytest.mark.skipif(os.name == "nt", reason="needs POSIX signals")
def test_a_stopped_run_says_how_to_go_on_in_the_callers_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in classlab.train(...): the exception said where it stopped and nothing of how to go on; the command
    line adds 'continue with --resume' itself, and a sweep 'run the same command again'."""
    from classlab.errors import RunInterrupted
    from tests.conftest import tiny_config
    from tests.faults import cli

    _ctrl_c_at_second_batch(monkeypatch)
    small = {"data.images_per_class": 20, "data.batch_size": 8, "model.layers": "[8,p]", "epochs": 1}
    with pytest.raises(RunInterrupted) as info:
        classlab.train(None, tiny_config(tmp_path, exp_name="stopped", **small), quiet=True)
    run = tmp_path / "runs" / "stopped"
    assert re.fullmatch(
        rf"stopped after batch \d+ of epoch 1; last\.ckpt holds that point; continue the run in {re.escape(str(run))} "
        r"with classlab\.train\(<the same config and overrides>, resume=True\)",
        str(info.value),
    ), str(info.value)
    with pytest.raises(RunInterrupted) as info:
        classlab.sweep(None, ["seed=0"], tiny_config(tmp_path, exp_name="sw", **small), quiet=True, say=lambda _: None)
    assert str(info.value).endswith(
        "last.ckpt holds that point; call classlab.sweep(...) again with the same arguments to continue the sweep"
    )
    code, _, err = cli(capsys, "train", *tiny_config(tmp_path, exp_name="cli", **small), "--quiet")
    line = r"\ninterrupted: stopped after batch \d+ of epoch 1; last\.ckpt holds that point; continue with --resume\n$"
    assert code == 130 and re.search(line, err), err[-2000:]


# ---------------------------------------------------------------------------------------------
# Library chatter: kept back from Python as on the command line, unless asked for

_TRAIN_TWICE = """
import logging, sys, warnings
import classlab

def state():
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "")
    loggers = [(logging.getLogger(n).level, tuple(logging.getLogger(n).handlers)) for n in names]
    return loggers, list(warnings.filters), warnings.showwarning

import classlab.train  # what importing it sets (Lightning's loggers and handler) is not the call's doing
before = state()
overrides = {
    "run.root": sys.argv[1], "data.cache_dir": sys.argv[2], "data.images_per_class": 10, "model.layers": [8, "p"],
    "epochs": 1, "trainer.progress": False, "trainer.threads": 1,
}
classlab.train(None, {**overrides, "exp_name": "plain"})
print("kept:", state() == before, flush=True)
print("=== verbose", flush=True)
print("=== verbose", file=sys.stderr, flush=True)
classlab.train(None, {**overrides, "exp_name": "loud"}, verbose=1)
print("kept:", state() == before, flush=True)
"""

LIGHTNING_LINES = ("GPU available", "LOCAL_RANK", "Trainer.fit", "| Name", "Total params", "TPU available")


def test_train_keeps_lightning_lines_back_unless_verbose(tmp_path: Path) -> None:
    """quiet=False printed Lightning's device report, its model summary and '`Trainer.fit` stopped' beside
    classlab's lines; the command line keeps them back unless -v. A process of its own: what a notebook sees,
    Lightning's handler writing to the stderr it found at import."""
    import subprocess
    import sys

    script = tmp_path / "train_twice.py"
    script.write_text(_TRAIN_TWICE)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("CLASSLAB_RUN_DIR", "CLASSLAB_LOCK_OWNER")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (plain_out, loud_out), (plain_err, loud_err) = (s.split("=== verbose\n") for s in (done.stdout, done.stderr))
    assert f"run folder: {tmp_path / 'runs' / 'plain'}" in plain_out and "finished in" in plain_out
    assert not [line for line in LIGHTNING_LINES if line in plain_out + plain_err], plain_out + plain_err
    assert "Trainer.fit" in loud_err and "finished in" in loud_out  # verbose=1 lets them through, as -v does
    assert plain_out.count("kept: True") == 1 and loud_out.count("kept: True") == 1  # logging as it was found
