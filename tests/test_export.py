"""Export: ONNX and torch.export files that match PyTorch, carry their class names, and serve predict."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import classlab
from classlab.errors import ClassLabError
from classlab.export import OnnxModel, export, load_pt2, read_onnx_metadata
from tests.conftest import REPO, make_image, run_cli

onnxruntime = pytest.importorskip("onnxruntime")


def test_onnx_matches_pytorch_with_dynamic_batch(tiny_run: Path) -> None:
    result = run_cli("export", str(tiny_run), "--format", "onnx")
    assert result.returncode == 0, result.stderr
    path = tiny_run / "export" / "model.onnx"
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    classes = json.loads((tiny_run / "classes.json").read_text())
    meta = read_onnx_metadata(path)
    assert json.loads(meta["classlab.classes"]) == [classes[str(i)] for i in range(len(classes))]
    assert meta["classlab.image_size"] == "32"
    assert meta["classlab.exporter"] == "dynamo"  # torch.onnx.export(dynamo=True), not the legacy exporter
    assert "warning" not in result.stderr
    model = classlab.load(tiny_run).model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (onnx_logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch_logits = model(x).numpy()
        np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4)


def test_the_input_recipe_says_what_each_colour_mode_does_with_transparency() -> None:
    """An RGB run lays a transparent image on white; a greyscale run's decode (PIL's convert('L')) drops the alpha,
    so the recipe of its file must not tell a deployer to lay it on white."""
    from PIL import Image

    from classlab.data.preprocess import image_to_tensor
    from classlab.export import input_recipe

    clear_black = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert int(image_to_tensor(clear_black, 8, 3).min()) == 255  # laid on white
    assert int(image_to_tensor(clear_black, 8, 1).max()) == 0  # the alpha dropped: black as its colour says
    assert "transparency on white" in input_recipe(8, 3)
    grey = input_recipe(8, 1)
    assert "on white" not in grey.replace("not laid on white", "") and "convert('L')" in grey


def test_the_written_input_recipe_reproduces_the_runs_predictions(tiny_run: Path, tmp_path: Path) -> None:
    """A deployer with only the .onnx file follows its classlab.input line by hand (PIL and numpy, no classlab):
    on photos of other sizes and shapes, in one batch, the file's probabilities are the run's own; also on
    large JPEGs (the draft decode) and one a phone stored on its side (EXIF orientation)."""
    from PIL import Image, ImageOps

    path = export(tiny_run, "onnx", tmp_path / "model.onnx")
    meta = read_onnx_metadata(path)
    size = int(meta["classlab.image_size"])
    recipe = meta["classlab.input"]
    assert f"shorter side to {size} px" in recipe and f"centre-crop {size}x{size}" in recipe and "255" in recipe
    assert f"img.draft(img.mode, ({size}, {size}))" in recipe and "EXIF" in recipe
    assert Path(meta["classlab.run"]).is_absolute()
    files, batch = [], []
    rng = np.random.default_rng(3)
    shapes = [(48, 40), (30, 50), (64, 64), (33, 90), (400, 300), (300, 520)]  # ..., large JPEGs (1/8, 1/4)
    for i, (w, h) in enumerate(shapes):  # wider, taller, square, narrow
        f = tmp_path / (f"{i}.png" if w < 100 else f"{i}.jpg")
        files.append(f)
        noise = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # blocky: survives JPEG
        pixels = Image.fromarray(noise).resize((w, h), Image.NEAREST)
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 5 else 1  # the last one stored on its side
        pixels.save(f, exif=exif.tobytes()) if f.suffix == ".jpg" else pixels.save(f)
        img = Image.open(f)
        if img.format == "JPEG":
            img.draft(img.mode, (size, size))
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        batch.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": np.stack(batch)})
    by_hand = torch.from_numpy(logits).softmax(1)
    run_probs = classlab.load(tiny_run).probabilities([str(f) for f in files])
    np.testing.assert_allclose(by_hand.numpy(), run_probs.numpy(), atol=1e-5)


def test_pt2_program_and_metadata(tiny_run: Path, tmp_path: Path) -> None:
    out = export(tiny_run, "pt2", tmp_path / "m.pt2")
    program, meta = load_pt2(out)
    assert json.loads(meta["classlab.classes"])[0] == "airplane"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), classlab.load(tiny_run).model(x), rtol=1e-4, atol=1e-4)


def test_predict_onnx_backend_same_classes(tiny_run: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128), (250, 250, 20)]):
        make_image(images / f"{i}.png", color, size=40)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    (tiny_run / "export" / "model.onnx").unlink(missing_ok=True)  # predict exports it when missing
    outs = {}
    for backend in ("torch", "onnx"):
        outs[backend] = tmp_path / f"{backend}.csv"
        result = run_cli(
            "predict", str(tiny_run), str(images), "--out", str(outs[backend]), "--backend", backend, "--quiet"
        )
        assert result.returncode == 0, result.stderr
    assert (tiny_run / "export" / "model.onnx").is_file()
    a, b = (list(csv.DictReader(open(outs[k]))) for k in ("torch", "onnx"))
    assert [r["class"] for r in a] == [r["class"] for r in b] and len(a) == 6
    for ra, rb in zip(a, b):
        if ra["prob"]:
            assert float(ra["prob"]) == pytest.approx(float(rb["prob"]), abs=1e-4)
        else:
            assert ra["error"] and rb["error"]


def test_missing_onnxruntime_names_the_extra(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ClassLabError, match=r"pip install 'classlab\[export\]'"):
        OnnxModel(tiny_run / "export" / "model.onnx")
    # The command line says the same in one line (a stand-in package that fails to import).
    fake = tmp_path / "fake"
    (fake / "onnxruntime").mkdir(parents=True)
    (fake / "onnxruntime" / "__init__.py").write_text("raise ImportError('no onnxruntime here')\n")
    make_image(tmp_path / "one.png", (10, 200, 10))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), str(REPO / "src")]))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "classlab.cli",
            "predict",
            str(tiny_run),
            str(tmp_path / "one.png"),
            "--backend",
            "onnx",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --backend onnx needs onnxruntime: pip install 'classlab[export]'"


def test_unknown_format_refused(tiny_run: Path) -> None:
    result = run_cli("export", str(tiny_run), "--format", "tflite")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def _matches(path: Path, run: Path) -> None:
    model = classlab.load(run).model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    (onnx_logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_logits, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_legacy_exporter_only_as_a_fallback_that_says_so(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import classlab.export as export_module

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the dynamo exporter's dependency is missing
    with pytest.warns(UserWarning) as caught:
        path = classlab.export(tiny_run, "onnx", tmp_path / "legacy.onnx")
    assert str(caught[0].message) == (
        "the dynamo ONNX exporter failed (onnxscript is not installed: pip install 'classlab[export]'); "
        "exported with the legacy TorchScript exporter instead"
    )
    assert read_onnx_metadata(path)["classlab.exporter"] == "torchscript"
    _matches(path, tiny_run)
    monkeypatch.delitem(sys.modules, "onnxscript")

    def refuse(*args: object) -> None:
        raise RuntimeError("cannot capture this model\nmore detail")

    monkeypatch.setattr(export_module, "_onnx_dynamo", refuse)
    with pytest.warns(UserWarning, match=r"failed \(cannot capture this model\); exported with the legacy"):
        classlab.export(tiny_run, "onnx", tmp_path / "legacy2.onnx")


def test_the_exported_file_alone_predicts_as_its_run_did(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The file a user ships, copied away from its run folder, predicts what the run predicts (in onnxruntime)."""
    from tests.faults import cli, error_lines

    images = tmp_path / "imgs"
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]):
        make_image(images / f"{i}.png", color, size=40)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    shipped = tmp_path / "elsewhere" / "shipped.onnx"
    shipped.parent.mkdir()
    shipped.write_bytes(export(tiny_run, "onnx", tmp_path / "m.onnx").read_bytes())

    by_run = classlab.predict(tiny_run, [images], tta="flip")
    code, out, err = cli(
        capsys, "predict", str(shipped), str(images), "--out", str(tmp_path / "p.csv"), "--tta", "flip"
    )
    assert code == 0, err
    assert out.startswith("wrote 5 predictions to ") and "onnx, TTA flip" in out
    by_file = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["class"] for r in by_file] == [r["class"] for r in by_run]
    for a, b in zip(by_run, by_file):
        assert (
            (float(a["prob"]) == pytest.approx(float(b["prob"]), abs=1e-4)) if b["prob"] else a["error"] and b["error"]
        )

    template = tmp_path / "info.csv"
    template.write_text("ImageID\n2.png\n0.png\n")
    done = classlab.predict.write_submission(shipped, [images], template, tmp_path / "sub.csv", label_format="name")
    assert done.rows == 2
    assert (tmp_path / "sub.csv").read_text().splitlines()[1:] == [
        f"2.png,{by_run[2]['class']}",
        f"0.png,{by_run[0]['class']}",
    ]

    import onnx

    foreign = onnx.load(str(shipped))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    export(tiny_run, "pt2", tmp_path / "m.pt2")
    refusals = {
        (str(shipped), "--backend", "torch"): "runs in onnxruntime; for --backend torch give the run folder",
        (str(shipped), "--checkpoint", "last"): "is one exported model: drop --checkpoint last, or give the run folder",
        (str(shipped), str(tiny_run), "--ensemble", "mean"): "an ensemble averages run folders; give the runs, not",
        (str(tmp_path / "foreign.onnx"),): "was not written by classlab export (no class names or input size in its",
        (str(tmp_path / "m.pt2"),): "is a .pt2 export; predict runs .onnx files (classlab export RUN --format onnx)",
    }
    for args, expected in refusals.items():
        code, _, err = cli(capsys, "predict", *args, str(images), "--out", str(tmp_path / "no.csv"))
        assert code != 0 and len(error_lines(err)) == 1 and expected in err, (args, err)
    assert not (tmp_path / "no.csv").exists()


def test_export_takes_its_format_as_a_word_too(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from tests.faults import cli

    code, out, err = cli(capsys, "export", str(tiny_run), "pt2", "--out", str(tmp_path / "a.pt2"))
    assert code == 0 and (tmp_path / "a.pt2").is_file(), err
    code, _, err = cli(capsys, "export", str(tiny_run), "pt2", "--format", "onnx")
    assert code == 2 and err.strip() == "error: pt2 and --format onnx given: keep one of the two"


def test_the_python_api_takes_what_the_command_line_takes(tiny_run: Path, tmp_path: Path) -> None:
    """A run's checkpoint file stands for the run (and picks the checkpoint); an exported .onnx file loads too."""
    images = [make_image(tmp_path / f"{i}.png", color, size=40) for i, color in enumerate([(200, 30, 30), (9, 9, 240)])]
    by_file = classlab.load(tiny_run / "checkpoints" / "last.ckpt").probabilities(images)
    torch.testing.assert_close(by_file, classlab.load(tiny_run, "last").probabilities(images))
    assert classlab.export(tiny_run / "checkpoints" / "last.ckpt") == tiny_run / "export" / "model-last.onnx"
    shipped = classlab.load(tiny_run / "export" / "model-last.onnx")
    torch.testing.assert_close(shipped.probabilities(images), by_file, rtol=1e-4, atol=1e-4)
    assert shipped(images[0])[0] == classlab.load(tiny_run, "last")(images[0])[0]
    with pytest.raises(ClassLabError, match=r"^last.ckpt given with checkpoint='epoch3': keep one of the two$"):
        classlab.load(tiny_run / "checkpoints" / "last.ckpt", "epoch3")
    # "best" said outright beside last.ckpt is a contradiction too (it read as the default once, and last was used).
    for call in (
        classlab.load,
        lambda r, c: classlab.evaluate(r, checkpoint=c),
        lambda r, c: classlab.predict(r, images, checkpoint=c),
    ):
        with pytest.raises(ClassLabError, match=r"^last.ckpt given with checkpoint='best': keep one of the two$"):
            call(tiny_run / "checkpoints" / "last.ckpt", "best")
    # predict with --backend onnx on a run's last.ckpt runs that checkpoint's export, not best's.
    rows = classlab.predict(tiny_run / "checkpoints" / "last.ckpt", images, backend="onnx")
    assert [r["class"] for r in rows] == [c for c, _ in classlab.load(tiny_run, "last")(images)]


def test_eval_or_export_of_an_exported_file_names_the_run_it_came_from(tiny_run: Path, tmp_path: Path) -> None:
    """An exported file where a run folder goes was called 'a file, not a run folder' with a pointer at
    classlab train; its metadata knows the run it came from, and predict scores with the file alone. eval of the
    file without --data has no split to evaluate: it says so, and names --data and the run."""
    path = export(tiny_run, "onnx", tmp_path / "model.onnx")
    result = run_cli("export", str(path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: '{path}' is an exported model: export reads a run folder"), line
    assert f"({tiny_run.resolve()})" in line and "classlab predict FILE IMAGES" in line
    result = run_cli("eval", str(path))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: '{path}' is an exported model: it holds no test or validation images"), line
    assert "--data FOLDER" in line and f"({tiny_run.resolve()})" in line


def _labelled(root: Path, per_class: dict[str, int]) -> Path:
    """root/<class>/*.png, noisy images of one colour a class, named as classes of the sample run."""
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]
    for (name, count), color in zip(per_class.items(), colors):
        for i in range(count):
            make_image(root / name / f"{name}{i}.png", color, size=40)
    return root


def test_the_exported_file_alone_evaluates_labelled_images(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: eval FILE.onnx --data FOLDER was refused with a line naming the run folder. The shipped file scores
    labelled images through predict's path (onnxruntime, the file's preprocessing and class names), prints the
    figures and writes files only where --out says; classlab.evaluate(FILE, data=...) is the same."""
    from tests.faults import cli, error_lines

    folder = _labelled(tmp_path / "labelled", {"ship": 5, "cat": 4, "truck": 3})
    (folder / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    shipped = tmp_path / "elsewhere" / "shipped.onnx"
    shipped.parent.mkdir()
    shipped.write_bytes(export(tiny_run, "onnx", tmp_path / "m.onnx").read_bytes())
    rows = [r for r in classlab.predict(shipped, [folder]) if not r["error"]]
    names = ("ship", "cat", "truck")
    right = {name: [r["class"] == name for r in rows if Path(r["path"]).parent.name == name] for name in names}
    top1 = sum(sum(v) for v in right.values()) / 12

    code, out, err = cli(capsys, "eval", str(shipped), "--data", str(folder), "--report")
    assert code == 0, err
    assert out.startswith(f"{shipped} [{folder}, onnxruntime, 12 images]")
    assert f"top-1 {top1:.4f}" in out and "expected calibration error (15 bins): " in out and "macro avg" in out
    assert "1 file(s) could not be read and are left out:" in err and "broken.jpg: " in err
    assert "nothing written (an exported model has no run folder): add --out FOLDER" in out
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["shipped.onnx"]

    metrics = classlab.evaluate(shipped, data=folder)
    assert metrics["out"] is None and metrics["top1"] == pytest.approx(top1, abs=1e-6)
    for name, hits in right.items():  # each folder's images scored as that class of the file (by name)
        assert metrics["per_class"][name] == pytest.approx(sum(hits) / len(hits), abs=1e-6)
    assert metrics["per_class"]["airplane"] is None and metrics["model"] == str(shipped)
    by_run = classlab.evaluate(tiny_run, data=folder)  # the run in PyTorch: the figures its file gives
    assert by_run["top1"] == pytest.approx(top1, abs=1e-6) and by_run["per_class"] == pytest.approx(
        metrics["per_class"]
    )
    manifest = tmp_path / "labels.csv"  # a manifest with the default columns: labels mapped by class name
    manifest.write_text("path,label\nlabelled/truck/truck0.png,truck\nlabelled/cat/cat1.png,cat\n")
    assert classlab.evaluate(shipped, data=manifest)["images"] == 2

    written = tmp_path / "checked"
    code, out, err = cli(capsys, "eval", str(shipped), "--data", str(folder), "--out", str(written), "--report")
    assert code == 0, err
    assert f"wrote {written}/{{metrics.json, confusion.csv, confusion.png, per_class.csv" in out
    saved = json.loads((written / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(top1, abs=1e-6) and saved["data_path"] == str(folder.resolve())
    report = json.loads((written / "report.json").read_text())
    assert report["inputs"]["model_sha256"] and 0 <= report["ece"] <= 1
    confusion = list(csv.reader(open(written / "confusion.csv")))
    assert sum(int(v) for row in confusion[1:] for v in row[1:]) == 12
    # --out is a folder the user chose: a report.json and errors/ of their own stay, with or without --report.
    mine = tmp_path / "project"
    (mine / "errors").mkdir(parents=True)
    (mine / "report.json").write_text('{"owner": "me"}')
    (mine / "errors" / "notes.txt").write_text("mine\n")
    for extra in ([], ["--report"]):
        code, _, err = cli(capsys, "eval", str(shipped), "--data", str(folder), "--out", str(mine), *extra)
        assert code == 0, err
        assert (mine / "errors" / "notes.txt").read_text() == "mine\n"
        if not extra:  # not a report of classlab's: not taken for a stale one
            assert json.loads((mine / "report.json").read_text()) == {"owner": "me"}
    assert sorted(p.name for p in (mine / "errors").iterdir())[-1] == "notes.txt"

    _labelled(tmp_path / "odd", {"cat": 2, "unicorn": 1})
    refusals = {
        ("--data", str(tmp_path / "odd")): "class(es) the model was not trained on: unicorn; the model's classes are",
        ("--data", str(folder), "--checkpoint", "last"): "is one exported model: drop --checkpoint last, or give",
        ("--data", str(folder), "--calibrate"): "--calibrate fits a temperature on a run's validation images",
    }
    for args, expected in refusals.items():
        code, _, err = cli(capsys, "eval", str(shipped), *args)
        assert code != 0 and len(error_lines(err)) == 1 and expected in err, (args, err)
    code, _, err = cli(capsys, "eval", str(tiny_run), "--out", str(written))
    assert code != 0 and "--out is for an exported model" in err, err
