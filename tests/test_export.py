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
    model = classlab.load(tiny_run).model
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        (onnx_logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            torch_logits = model(x).numpy()
        np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4)


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
