"""Temperature scaling (``eval --calibrate``): the fitted T is the NLL minimum, it moves no argmax, and every
reader of the run (eval, predict, ``classlab.load``, ensembles, export) uses it only for the checkpoint it was
fitted on."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import classlab
from classlab.data.pipeline import load_data
from classlab.engine.calibration import T_MAX, T_MIN, fit_temperature
from classlab.errors import ClassLabError
from tests.conftest import make_image, run_cli, tiny_config

SHARPEN = 10.0  # the tiny run's logits times this: a model far more sure than it is right


def scale_head(checkpoint: Path, factor: float) -> None:
    """Multiply the classifier's last layer (weight and bias), so every logit is ``factor`` times what it was."""
    ckpt = torch.load(checkpoint, weights_only=True)
    state = ckpt["state_dict"]
    weight = [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2][-1]
    for key in (weight, weight.removesuffix(".weight") + ".bias"):
        state[key] = state[key] * factor
    torch.save(ckpt, checkpoint)


@pytest.fixture
def sharp_run(tiny_trained: Path, tmp_path: Path) -> Path:
    """A copy of the session's tiny run whose best.ckpt gives SHARPEN times its logits: over-confident."""
    run = tmp_path / "sharp"
    shutil.copytree(tiny_trained, run)
    scale_head(run / "checkpoints" / "best.ckpt", SHARPEN)
    return run


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [make_image(tmp_path / "photos" / f"p{i}.png", (40 * i, 200 - 30 * i, 90), size=40) for i in range(6)]


def val_logits(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain logits and labels of the run's validation images, through the model's own forward."""
    loaded = classlab.load(run, calibrated=False)
    data = load_data(loaded.cfg, split=json.loads((run / "split.json").read_text()), with_test=False)
    logits, labels = [], []
    with torch.no_grad():
        for x, y in data.val.loader(256, shuffle=False, seed=0, size=data.size):
            logits.append(loaded.model(x).double())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def grid_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The NLL's minimum over a grid of T, then a finer grid around it (0.05% apart): a fit that shares nothing
    with LBFGS."""
    low, high = -1.3, 1.3  # log10 T: 0.05 .. 20
    for _ in range(3):
        grid = torch.logspace(low, high, 101, dtype=torch.float64)
        best = int(torch.stack([F.cross_entropy(logits.double() / t, labels) for t in grid]).argmin())
        step = (high - low) / 100
        low, high = low + (best - 1) * step, low + (best + 1) * step
    return float(10 ** ((low + high) / 2))


def raw_logits(run: Path, files: list[Path]) -> torch.Tensor:
    loaded = classlab.load(run, calibrated=False)
    with torch.no_grad():
        return loaded.model(torch.stack([loaded.to_tensor(f) for f in files])).double()


def test_fit_finds_the_temperature_that_made_the_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8000, 10, generator=g, dtype=torch.float64) * 4
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g).squeeze(1)
    temperature, held = fit_temperature(logits, labels)
    assert not held and temperature == pytest.approx(2.5, rel=0.06)
    assert temperature == pytest.approx(grid_temperature(logits, labels), rel=2e-3)
    # Right on every image: the NLL falls for ever as T -> 0; T is held at the bound, and says so.
    sure = torch.eye(3, dtype=torch.float64).repeat(10, 1) * 5
    assert fit_temperature(sure, sure.argmax(1)) == (T_MIN, True)
    # The true class below the mean logit on average: the NLL falls for ever as T grows.
    assert fit_temperature(sure, (sure.argmax(1) + 1) % 3) == (T_MAX, True)


def test_calibrate_fits_t_on_the_validation_split_and_moves_no_argmax(sharp_run: Path) -> None:
    out = sharp_run / "eval" / "val"  # the split it is fitted on (the test split is 1000 images: slower)
    classlab.evaluate(sharp_run, split="val")
    plain = json.loads((out / "metrics.json").read_text())
    confusion = (out / "confusion.csv").read_text()

    result = run_cli("eval", str(sharp_run), "--split", "val", "--calibrate")
    assert result.returncode == 0, result.stderr
    assert "calibrated: T=" in result.stdout and "accuracy unchanged" in result.stdout
    assert "val: ECE " in result.stdout and "warning" not in result.stderr
    assert "(the images T was fitted on: judge it on the test split)" in result.stdout

    record = json.loads((sharp_run / "calibration.json").read_text())
    temperature = record["temperature"]
    digest = hashlib.sha256((sharp_run / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()
    assert record["checkpoint"] == "best" and record["checkpoint_sha256"] == digest
    z, y = val_logits(sharp_run)
    assert record["val_images"] == len(y) == len(json.loads((sharp_run / "split.json").read_text())["val"])
    assert temperature > 1.5  # over-confident logits are softened
    assert temperature == pytest.approx(grid_temperature(z, y), rel=0.01)
    assert record["val_nll_before"] == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-4)
    assert record["val_nll_after"] == pytest.approx(float(F.cross_entropy(z / temperature, y)), rel=1e-4)
    assert record["val_nll_after"] < record["val_nll_before"]
    assert not list(sharp_run.glob(".*.tmp"))

    calibrated = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "top5", "f1", "per_class"):
        assert calibrated[key] == plain[key], key
    assert (out / "confusion.csv").read_text() == confusion
    cal = calibrated["calibration"]
    assert cal["temperature"] == pytest.approx(temperature) and cal["fitted_now"]
    assert cal["nll_before"] == pytest.approx(record["val_nll_before"], rel=1e-4)
    assert cal["nll_after"] == pytest.approx(record["val_nll_after"], rel=1e-4)
    assert cal["ece_after"] < cal["ece_before"]

    # A later eval uses it, says so once, and its report is of the calibrated probabilities.
    again = classlab.evaluate(sharp_run, split="val", report=True)
    assert again["top1"] == pytest.approx(plain["top1"])
    assert [n for n in again["notes"] if "calibrated" in n] == [f"probabilities calibrated: T={temperature:.4g} "
                                                                "(calibration.json)"]  # fmt: skip
    assert again["report"]["ece"] == pytest.approx(cal["ece_after"], abs=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["predictions"] == f"plain, calibrated T={temperature:.4g}"


def test_predict_load_and_ensembles_give_softmax_of_logits_over_t(
    sharp_run: Path, photos: list[Path], tmp_path: Path
) -> None:
    classlab.evaluate(sharp_run, split="val", calibrate=True)
    temperature = json.loads((sharp_run / "calibration.json").read_text())["temperature"]
    z = raw_logits(sharp_run, photos)
    expected = (z / temperature).softmax(1)
    classes = classlab.load(sharp_run).classes

    out = tmp_path / "preds.csv"
    result = classlab.predict(sharp_run, photos, out, top=3)
    assert result.calibration_note == f"probabilities calibrated: T={temperature:.4g} (calibration.json)"
    rows = {row["path"]: row for row in csv.DictReader(out.open())}
    for file, p, logits in zip(photos, expected, z):
        row = rows[str(file)]
        top = p.topk(3)
        assert row["class"] == classes[int(logits.argmax())]  # the argmax of the plain logits
        assert [row["class"], row["top2_class"], row["top3_class"]] == [classes[int(i)] for i in top.indices]
        for column, value in zip(("prob", "top2_prob", "top3_prob"), top.values):
            assert float(row[column]) == pytest.approx(float(value), abs=2e-6)

    loaded = classlab.load(sharp_run)
    assert loaded.temperature == temperature
    name, prob = loaded(photos[0])
    assert name == classes[int(z[0].argmax())] and prob == pytest.approx(float(expected[0].max()), abs=1e-6)
    assert torch.allclose(classlab.load(sharp_run, calibrated=False).probabilities(photos), z.softmax(1).float())

    # An ensemble averages its members' calibrated probabilities (here the run with itself: the same ones).
    ensemble = classlab.load([sharp_run, sharp_run])
    assert torch.allclose(ensemble.probabilities(photos), expected.float(), atol=1e-6)
    assert ensemble.calibration_note.startswith("probabilities calibrated: 2 of 2 members")


def test_eval_data_reports_the_calibrated_figures(sharp_run: Path, tmp_path: Path) -> None:
    for i in range(4):
        make_image(tmp_path / "new" / "ship" / f"s{i}.png", (40, 60, 200))
        make_image(tmp_path / "new" / "frog" / f"f{i}.png", (60, 160, 40))
    plain = classlab.evaluate(sharp_run, data=tmp_path / "new")
    calibrated = classlab.evaluate(sharp_run, data=tmp_path / "new", calibrate=True)
    assert calibrated["top1"] == plain["top1"] and calibrated["per_class"] == plain["per_class"]
    cal = calibrated["calibration"]
    z = raw_logits(sharp_run, sorted((tmp_path / "new").rglob("*.png")))
    labels = torch.tensor([6 if p.parent.name == "frog" else 8 for p in sorted((tmp_path / "new").rglob("*.png"))])
    assert cal["nll_before"] == pytest.approx(float(F.cross_entropy(z, labels)), rel=1e-3)
    assert cal["nll_after"] == pytest.approx(float(F.cross_entropy(z / cal["temperature"], labels)), rel=1e-3)


def test_a_calibration_of_another_checkpoint_is_not_used(sharp_run: Path, photos: list[Path]) -> None:
    classlab.evaluate(sharp_run, split="val", calibrate=True)
    assert classlab.load(sharp_run).temperature is not None
    scale_head(sharp_run / "checkpoints" / "best.ckpt", 0.5)  # as a resumed run's new best.ckpt: other logits
    with pytest.warns(UserWarning, match=r"calibration\.json was fitted for another best\.ckpt.*calibrate=True"):
        loaded = classlab.load(sharp_run)
    assert loaded.temperature is None and loaded.calibration_note is None
    z = raw_logits(sharp_run, photos)
    assert torch.allclose(loaded.probabilities(photos), z.softmax(1).float())
    with pytest.warns(UserWarning, match="not calibrated"):
        result = classlab.predict(sharp_run, photos)
    assert result.calibration_note is None
    assert [row["prob"] for row in result] == [round(float(p.max()), 6) for p in z.softmax(1)]
    with pytest.warns(UserWarning, match="not calibrated"):
        metrics = classlab.evaluate(sharp_run, split="val")
    assert "calibration" not in metrics
    # calibration.json is best.ckpt's: last.ckpt (the unsharpened weights) has none.
    assert classlab.load(sharp_run, "last").temperature is None


def test_runs_that_cannot_be_calibrated_are_one_line_and_nothing_written(sharp_run: Path, tmp_path: Path) -> None:
    overrides = {"data.val_fraction": 0, "data.images_per_class": 10, "trainer.threads": 1}
    run = Path(classlab.train(None, tiny_config(tmp_path, exp_name="noval", epochs=1, **overrides), quiet=True))
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = run_cli("eval", str(run), "--calibrate")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --calibrate") and "data.val_fraction" in lines[0], lines
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files
    # An ensemble with one such member: refused before any member is fitted, so none is written.
    with pytest.raises(ClassLabError, match=r"has none \(data.val_fraction was 0\)"):
        classlab.evaluate([sharp_run, run], calibrate=True)
    assert not (sharp_run / "calibration.json").exists()


def test_a_k_fold_ensemble_calibrates_each_fold_on_its_own_held_out_images(tmp_path: Path) -> None:
    """A competition's k-fold ensemble judged by log loss: each fold's T is fitted on that fold's validation
    images (its held-out fold), and the ensemble averages the calibrated probabilities."""
    overrides = {"data.folds": 2, "data.images_per_class": "null", "trainer.threads": 1}
    folds = Path(classlab.train(None, tiny_config(tmp_path, exp_name="kf", epochs=1, **overrides), quiet=True))
    result = run_cli("eval", str(folds), "--ensemble", "mean", "--calibrate")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("calibrated ")]
    assert len(lines) == 2, result.stdout
    for line, fold in zip(lines, sorted(p for p in folds.iterdir() if (p / "split.json").is_file())):
        record = json.loads((fold / "calibration.json").read_text())
        z, y = val_logits(fold)
        assert record["val_images"] == len(y) == len(json.loads((fold / "split.json").read_text())["val"])
        assert record["temperature"] == pytest.approx(grid_temperature(z, y), rel=0.01)
        assert line.startswith(f"calibrated {fold}: T={record['temperature']:.4f}")
    assert "2 of 2 members" in classlab.load(folds).calibration_note


def test_export_bakes_t_into_the_logits_and_records_it(sharp_run: Path, photos: list[Path]) -> None:
    pytest.importorskip("onnxruntime")
    from classlab.export import read_onnx_metadata

    classlab.evaluate(sharp_run, split="val", calibrate=True)
    temperature = json.loads((sharp_run / "calibration.json").read_text())["temperature"]
    path = classlab.export(sharp_run)
    meta = read_onnx_metadata(path)
    assert float(meta["classlab.temperature"]) == temperature and "calibrated logits" in meta["classlab.output"]
    z = raw_logits(sharp_run, photos)
    exported = classlab.load(path)
    assert exported.temperature == temperature
    assert torch.allclose(exported.probabilities(photos), (z / temperature).softmax(1).float(), atol=1e-5)
    assert torch.allclose(classlab.load(path, calibrated=False).probabilities(photos), z.softmax(1).float(), atol=1e-5)
    # --backend onnx exports again once the calibration is gone: it gives what torch gives.
    (sharp_run / "calibration.json").unlink()
    rows = list(classlab.predict(sharp_run, photos, backend="onnx"))
    assert "classlab.temperature" not in read_onnx_metadata(path)
    assert [float(r["prob"]) for r in rows] == pytest.approx([float(p.max()) for p in z.softmax(1)], abs=1e-5)


def test_an_eval_that_fails_after_the_fit_leaves_the_calibration_as_it_found_it(
    sharp_run: Path, tmp_path: Path
) -> None:
    # The fit comes first; an error after it (a wrong --data, a wrong --tta, a run without a test part) is
    # the whole command's answer, and no calibration the user did not see fitted is left behind.
    with pytest.raises(ClassLabError, match="does not exist"):
        classlab.evaluate(sharp_run, data=tmp_path / "missing", calibrate=True)
    assert not (sharp_run / "calibration.json").exists()
    assert classlab.load(sharp_run).temperature is None
    earlier = b'{"temperature": 2.5, "checkpoint_sha256": "of another best.ckpt"}\n'
    (sharp_run / "calibration.json").write_bytes(earlier)
    with pytest.raises(ClassLabError, match="unknown mode"):
        classlab.evaluate(sharp_run, split="val", tta="bogus", calibrate=True)
    assert (sharp_run / "calibration.json").read_bytes() == earlier
    assert not list(sharp_run.glob(".*.tmp"))


def test_a_checkpoint_replaced_while_t_is_fitted_is_not_calibrated_by_it(
    sharp_run: Path, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import classlab.evaluate as evaluate_module

    fitted_on = evaluate_module.predict_logits

    def best_replaced_meanwhile(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        out = fitted_on(*args, **kwargs)
        scale_head(sharp_run / "checkpoints" / "best.ckpt", 0.5)  # a run still training writes its new best.ckpt
        return out

    monkeypatch.setattr(evaluate_module, "predict_logits", best_replaced_meanwhile)
    with pytest.warns(UserWarning, match=r"fitted for another best\.ckpt"):
        classlab.evaluate(sharp_run, split="val", calibrate=True)
    with pytest.warns(UserWarning, match="not calibrated"):
        loaded = classlab.load(sharp_run)
    assert loaded.temperature is None  # the T of the weights read is not used for the new file's
    assert torch.allclose(loaded.probabilities(photos), raw_logits(sharp_run, photos).softmax(1).float())


def test_the_checkpoint_digest_follows_a_rewrite_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    import os
    import time

    from classlab.run import file_sha256

    path = tmp_path / "best.ckpt"
    path.write_bytes(b"a" * 64)
    kept = path.stat()
    assert file_sha256(path) == hashlib.sha256(b"a" * 64).hexdigest()
    time.sleep(0.05)
    path.write_bytes(b"b" * 64)  # as long as the old one, as two checkpoints of one model are
    os.utime(path, ns=(kept.st_atime_ns, kept.st_mtime_ns))  # as cp -p, rsync -a and tar keep a file's time
    assert path.stat().st_size == kept.st_size and path.stat().st_mtime_ns == kept.st_mtime_ns
    assert file_sha256(path) == hashlib.sha256(b"b" * 64).hexdigest()


def test_a_validation_split_that_tells_no_temperature_writes_none(
    sharp_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model right on every validation image lowers the NLL for ever as T -> 0: writing the bound (T = 0.05)
    would have made every later probability 20 times sharper on the word of a split that says nothing."""
    import classlab.evaluate as evaluate_module

    fitted_on = evaluate_module.predict_logits

    def right_on_every_image(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = fitted_on(*args, **kwargs)
        return logits, logits.argmax(1)

    before = sorted(p.name for p in sharp_run.iterdir())
    monkeypatch.setattr(evaluate_module, "predict_logits", right_on_every_image)
    with pytest.raises(ClassLabError, match=r"no temperature in \[0.05, 20\] .* none is written .*data.val_fraction"):
        classlab.evaluate(sharp_run, split="val", calibrate=True)
    assert sorted(p.name for p in sharp_run.iterdir()) == before
    assert classlab.load(sharp_run).temperature is None
