"""Multi-task heads: combined labels, the CSV source with several label columns, training, load/predict/eval,
attention fusion, and a frozen pretrained backbone that really stays frozen."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import classlab
from classlab.config import load_config
from classlab.data.pipeline import DataProblems, load_data
from classlab.data.tasks import TaskLayout, combined_index, combined_names
from classlab.errors import ClassLabError, ConfigError
from classlab.models.multitask import joint_log_probs
from classlab.run import safe_torch_load
from tests.conftest import make_image

MASK = {"wear": 220, "incorrect": 130, "none": 40}  # red channel
GENDER = {"female": 210, "male": 50}  # green channel
AGE = {"<30": 200, "30-60": 120, ">=60": 40}  # blue channel


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mask-competition-like manifest: each person has one gender and age and three mask photos."""
    root = tmp_path_factory.mktemp("mt") / "img"
    rows = ["path,mask,sex,age,person"]
    for p in range(24):
        gender = ("female", "male")[p % 2]
        age = ("<30", "30-60", ">=60")[(p // 2) % 3]
        for mask in MASK:
            name = f"p{p}_{mask}.png"
            make_image(root / name, (MASK[mask], GENDER[gender], AGE[age]), size=16, noise=12)
            rows.append(f"{name},{mask},{gender},{age},p{p}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def _overrides(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "task=multitask",
        "data.dataset=csv",
        f"data.root={root}",
        "data.csv_file=train.csv",
        "data.group_column=person",
        "data.val_fraction=0.25",
        "data.image_size=16",
        "data.batch_size=24",
        f"data.cache_dir={tmp / 'cache'}",
        f"run.root={tmp / 'runs'}",
        "model.layers=[8,p,16,p]",
        "model.tasks={mask: {}, gender: {column: sex, weight: 0.5}, age: {classes: 3}}",
        "optim.lr=0.05",
        "epochs=2",
        "trainer.progress=false",
        *extra,
    ]


def test_combined_labels_round_trip_and_product_rule() -> None:
    classes = {"mask": ["wear", "none"], "gender": ["f", "m"], "age": ["a", "b", "c"]}
    names = combined_names(classes)
    assert len(names) == 12 and names[0] == "mask=wear|gender=f|age=a" and names[-1] == "mask=none|gender=m|age=c"
    values = [("none", "f", "b"), ("wear", "m", "c")]
    index = combined_index(classes, values)
    assert [names[i] for i in index] == ["mask=none|gender=f|age=b", "mask=wear|gender=m|age=c"]
    layout = TaskLayout(
        ("mask", "gender", "age"), ("mask", "gender", "age"), tuple(map(tuple, classes.values())), (1,) * 3
    )
    parts = layout.split(torch.tensor(index))
    assert [p.tolist() for p in parts] == [[1, 0], [0, 1], [1, 2]]
    logits = [torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 3)]
    joint = joint_log_probs(logits).softmax(1).view(4, 2, 2, 3)
    probs = [t.softmax(1) for t in logits]
    product = probs[0][:, :, None, None] * probs[1][:, None, :, None] * probs[2][:, None, None, :]
    assert torch.allclose(joint, product, atol=1e-6)


def test_csv_reads_every_task_column(manifest: Path, tmp_path: Path) -> None:
    cfg = load_config(None, _overrides(manifest, tmp_path))
    data = load_data(cfg)
    assert data.tasks == {
        "mask": ["incorrect", "none", "wear"],
        "gender": ["female", "male"],
        "age": ["30-60", "<30", ">=60"],  # natural order (classlab.data.sources.natural_key)
    }
    assert len(data.classes) == 18 and data.classes[0] == "mask=incorrect|gender=female|age=30-60"
    persons = [f"p{i // 3}" for i in range(72)]
    train_people = {persons[i] for i in data.split["train"]}
    val_people = {persons[i] for i in data.split["val"]}
    assert val_people and not train_people & val_people  # grouping still holds under the combined label
    # Labels decode back to the manifest's values.
    layout = TaskLayout.from_config(cfg, data.tasks)
    rows = list(csv.DictReader(open(manifest / "train.csv")))
    labels = torch.cat([data.train.labels, data.val.labels])
    order = data.split["train"] + data.split["val"]
    for (mask, sex, age), k in zip(zip(*[p.tolist() for p in layout.split(labels)]), order):
        assert (layout.classes[0][mask], layout.classes[1][sex], layout.classes[2][age]) == (
            rows[k]["mask"],
            rows[k]["sex"],
            rows[k]["age"],
        )


def test_multitask_config_errors(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs data.dataset=csv"):
        load_config(None, ["task=multitask", "model.tasks={a: {}}"])
    with pytest.raises(ConfigError, match="model.fusion needs task=multitask"):
        load_config(None, ["model.fusion=attention"])
    with pytest.raises(ConfigError, match="mixup"):
        load_config(None, [*_overrides(manifest, tmp_path), "aug.mixup_alpha=0.2"])
    with pytest.raises(ConfigError, match="every task's weight is 0, so the loss is 0"):
        load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: {weight: 0}, sex: {weight: 0}}"])
    # A monitor no metric answers to failed after the first epoch, with a run folder left behind.
    with pytest.raises(ConfigError, match=r"trainer.monitor=val/gendr/f1 .*did you mean 'val/gender/f1'"):
        load_config(None, [*_overrides(manifest, tmp_path), "trainer.monitor=val/gendr/f1"])
    assert load_config(None, [*_overrides(manifest, tmp_path), "trainer.monitor=val/age/f1"]).trainer.monitor
    with pytest.raises(ConfigError, match=r"did you mean 'model.tasks.mask.weight'\? a task's keys: classes, column"):
        load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: {wieght: 1}, sex: {}}"])
    # A task given a bare value: its own keys are named, where 'model.tasks' was called a value, not a section.
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: 3, sex: {}}"])
    assert str(caught.value) == (
        "'model.tasks.mask' is a section, not a value: set one of its keys, e.g. model.tasks.mask.classes=3 "
        "(its keys: classes, column, weight)"
    )
    # Left at task=classify, the tasks went unread and the run asked for a 'label' column.
    with pytest.raises(ConfigError, match=r"^model.tasks \(mask, sex\) are read by task=multitask: set task=multi"):
        load_config(None, [*_overrides(manifest, tmp_path), "task=classify", "model.tasks={mask: {}, sex: {}}"])
    cfg = load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: {}, sex: {column: SEX }}"])
    with pytest.raises(ClassLabError, match=r"no column 'SEX' \(model.tasks.sex.column\); did you mean .*=sex\?$"):
        load_data(cfg)
    cfg = load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: {}, hair: {}}"])
    with pytest.raises(ClassLabError, match=r"no column 'hair' \(model.tasks.hair.column\)"):
        load_data(cfg)
    cfg = load_config(None, [*_overrides(manifest, tmp_path), "model.tasks={mask: {classes: 2}, sex: {}}"])
    with pytest.raises(ClassLabError, match=r"model.tasks.mask.classes=2 but column 'mask' has 3"):
        classlab.train(cfg, quiet=True)
    assert not (tmp_path / "runs").exists()


def test_train_load_predict_eval(manifest: Path, tmp_path: Path) -> None:
    run = classlab.train(None, _overrides(manifest, tmp_path, "exp_name=mt", "model.fusion=attention"), quiet=True)
    classes = json.loads((run.path / "classes.json").read_text())
    assert len(classes) == 18 and classes["17"] == "mask=wear|gender=male|age=>=60"
    tasks = json.loads((run.path / "tasks.json").read_text())["tasks"]
    assert [(t["name"], t["column"], t["weight"]) for t in tasks] == [
        ("mask", "mask", 1.0),
        ("gender", "sex", 0.5),
        ("age", "age", 1.0),
    ]
    rows = list(csv.DictReader(open(run.path / "metrics.csv")))
    assert len(rows) == 2 and all(rows[-1][f"val/{t}/acc"] for t in ("mask", "gender", "age"))
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["status"] == "finished" and 0.0 <= summary["val/gender/acc"] <= 1.0
    assert summary["best_val_acc"] == pytest.approx(max(float(r["val/acc"]) for r in rows), abs=1e-5)
    assert (run.path / "checkpoints" / "best.ckpt").is_file()
    ckpt = torch.load(run.path / "checkpoints" / "best.ckpt", weights_only=True)
    assert any(k.startswith("model.net.fusion.attn") for k in ckpt["state_dict"])

    loaded = classlab.load(run.path)
    assert loaded.tasks.names == ("mask", "gender", "age")
    name, prob = loaded(manifest / "p0_wear.png")
    assert name in classes.values() and 0.0 < prob <= 1.0
    combined, per_task = loaded.task_probabilities([manifest / "p0_wear.png", manifest / "p1_none.png"])
    assert combined.shape == (2, 18) and [p.shape[1] for p in per_task] == [3, 2, 3]
    assert torch.allclose(combined.sum(1), torch.ones(2), atol=1e-5)

    out = tmp_path / "pred.csv"
    (tmp_path / "bad.png").write_bytes(b"nope")
    result = classlab.predict(run.path, [manifest / "p0_wear.png", tmp_path / "bad.png"], out)
    assert result.count == 2 and result.failed_count == 1
    pred = list(csv.DictReader(open(out)))
    header = list(pred[0])
    assert header[:3] == ["path", "class", "prob"] and header[-1] == "error"
    assert {"mask_class", "mask_prob", "gender_class", "gender_prob", "age_class", "age_prob"} <= set(header)
    assert pred[0]["gender_class"] in ("female", "male") and pred[0]["class"].count("|") == 2
    assert pred[1]["error"] and not pred[1]["mask_class"]

    metrics = classlab.evaluate(run.path, split="val")
    assert set(metrics["tasks"]) == {"mask", "gender", "age"}
    # eval scores best.ckpt: the same numbers validation logged for the best epoch.
    assert metrics["top1"] == pytest.approx(summary["best_val_acc"], abs=1e-5)
    for t in ("mask", "gender", "age"):
        assert metrics["tasks"][t] == pytest.approx(summary[f"val/{t}/acc"], abs=1e-5)
    # One temperature is a single-label classifier's: a multitask run is refused in one line, nothing written.
    with pytest.raises(ClassLabError, match="multitask run.*without calibrating"):
        classlab.evaluate(run.path, calibrate=True)
    assert not (run.path / "calibration.json").exists()

    # The HTML page gives each task's figures, not only the combined class's (the manifest has no test part).
    page = classlab.report(run.path, tmp_path / "page.html", split="val").read_text(encoding="utf-8")
    assert '<table class="sortable" id="per-task">' in page
    for t in ("mask", "gender", "age"):
        assert f'<td data-sort="{t}">{t}</td><td data-sort="{round(metrics["tasks"][t], 6)!r}">' in page


def test_frozen_pretrained_backbone_is_unchanged(manifest: Path, tmp_path: Path) -> None:
    from classlab.models import build_model

    torch.manual_seed(3)
    donor = build_model({"name": "cnn", "layers": [8, "p", 16, "p"]}, num_classes=5, image_size=16)
    # Non-trivial BatchNorm statistics, so that running-mean drift would show.
    for module in donor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
    weights = tmp_path / "donor.pt"
    torch.save(donor.state_dict(), weights)
    run = classlab.train(
        None,
        _overrides(
            manifest,
            tmp_path,
            "exp_name=frozen",
            "model.pretrained=true",
            f"model.pretrained_path={weights}",
            "model.freeze=all",
        ),
        quiet=True,
    )
    state = safe_torch_load(run.checkpoint("last"))["state_dict"]
    backbone = {
        k.removeprefix("model.net.backbone."): v for k, v in state.items() if k.startswith("model.net.backbone.")
    }
    reference = {k: v for k, v in donor.state_dict().items() if not k.startswith("head.")}
    assert set(backbone) == set(reference)  # the donor's classifier is not carried along
    for key, value in reference.items():
        assert torch.equal(backbone[key], value), key
    heads = [k for k in state if k.startswith("model.net.heads.")]
    assert heads and not np.allclose(state["model.net.heads.0.weight"].numpy(), 0.0)


def test_test_manifest_uses_the_training_tasks_classes(manifest: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(open(manifest / "train.csv")))[:6]
    with open(manifest / "test_mt.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # The training manifest's own images are no test set: each is named (their test_acc was a training figure).
    with pytest.raises(DataProblems, match=r"p0_\w+\.png: listed in both train\.csv and test_mt\.csv"):
        load_data(load_config(None, _overrides(manifest, tmp_path, "data.test_csv_file=test_mt.csv")))
    for row in rows:  # copies under new names: held-out images with the same labels
        shutil.copy(manifest / row["path"], manifest / f"held_{row['path']}")
        row["path"] = f"held_{row['path']}"
    with open(manifest / "test_mt.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = load_data(load_config(None, _overrides(manifest, tmp_path, "data.test_csv_file=test_mt.csv")))
    assert data.test is not None and len(data.test) == 6
    index = combined_index(data.tasks, [(r["mask"], r["sex"], r["age"]) for r in rows])
    assert sorted(data.test.labels.tolist()) == sorted(index)
    (manifest / "odd_mt.csv").write_text("path,mask,sex,age,person\nheld_p0_wear.png,wear,female,teen,p0\n")
    with pytest.raises(ClassLabError, match=r"labels not in the training manifest's task age: teen"):
        load_data(load_config(None, _overrides(manifest, tmp_path, "data.test_csv_file=odd_mt.csv")))


def test_the_exported_file_predicts_every_task_as_the_run_does(manifest: Path, tmp_path: Path) -> None:
    """Before: the .onnx of a multitask run wrote only the combined class; the mask/gender/age columns were gone."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    run = classlab.train(None, _overrides(manifest, tmp_path, "exp_name=mt_onnx", "epochs=1"), quiet=True)
    onnx_file = classlab.export(run, "onnx")
    images = [manifest / "p0_wear.png", manifest / "p5_none.png", manifest / "p10_incorrect.png"]
    by_torch = classlab.predict(run.path, images, tmp_path / "torch.csv")
    by_onnx = classlab.predict(onnx_file, images, tmp_path / "onnx.csv")
    assert by_onnx.backend == "onnx" and by_onnx.columns == by_torch.columns
    # The run with --backend onnx runs that file too (it was refused: 'does not give the per-task predictions').
    by_backend = classlab.predict(run.path, images, tmp_path / "backend.csv", backend="onnx")
    assert by_backend.backend == "onnx"
    assert (tmp_path / "backend.csv").read_text() == (tmp_path / "onnx.csv").read_text()
    torch_rows = list(csv.DictReader(open(tmp_path / "torch.csv")))
    onnx_rows = list(csv.DictReader(open(tmp_path / "onnx.csv")))
    for mine, theirs in zip(torch_rows, onnx_rows, strict=True):
        for task in ("mask", "gender", "age"):
            assert theirs[f"{task}_class"] == mine[f"{task}_class"] != ""
            assert float(theirs[f"{task}_prob"]) == pytest.approx(float(mine[f"{task}_prob"]), abs=1e-4)
        assert theirs["class"] == mine["class"]
    # A consumer that reads one output still gets the combined logits first.
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "logits_mask", "logits_gender", "logits_age"]


# Each task's class order (model.tasks.<task>.classes as a list): mask and age reordered, gender left natural.
ORDERED = (
    "model.tasks={mask: {classes: [wear, none, incorrect]}, gender: {column: sex, weight: 0.5}, age: {}}",
    'model.tasks.age.classes=[<30,30-60,">=60"]',  # a key=value override into one task
)
ORDER = {"mask": ["wear", "none", "incorrect"], "gender": ["female", "male"], "age": ["<30", "30-60", ">=60"]}


def test_task_classes_set_each_tasks_order(manifest: Path, tmp_path: Path) -> None:
    """Before: each task's classes came in natural order (age: 30-60, <30, >=60) and a list here was refused."""
    cfg = load_config(None, _overrides(manifest, tmp_path, *ORDERED))
    assert cfg.model.tasks is not None and cfg.model.tasks["age"].classes == ORDER["age"]
    data = load_data(cfg)
    assert data.tasks == ORDER
    assert data.classes[:2] == ["mask=wear|gender=female|age=<30", "mask=wear|gender=female|age=30-60"]
    assert data.classes[-1] == "mask=incorrect|gender=male|age=>=60"
    # The training targets: each image's combined label decodes, in the new order, to its manifest row's values.
    layout = TaskLayout.from_config(cfg, data.tasks)
    rows = list(csv.DictReader(open(manifest / "train.csv")))
    labels = torch.cat([data.train.labels, data.val.labels])
    decoded = zip(*[[layout.classes[t][i] for i in p.tolist()] for t, p in enumerate(layout.split(labels))])
    expected = [(rows[k]["mask"], rows[k]["sex"], rows[k]["age"]) for k in data.split["train"] + data.split["val"]]
    assert list(decoded) == expected
    # The same order from a YAML file; a count still only checks the number of classes.
    config = tmp_path / "mt.yaml"
    config.write_text(
        "model:\n  tasks:\n    mask: {classes: 3}\n    gender: {column: sex}\n"
        '    age:\n      classes: [<30, 30-60, ">=60"]\n'
    )
    cfg = load_config(config, [o for o in _overrides(manifest, tmp_path) if not o.startswith("model.tasks")])
    assert cfg.model.tasks is not None and [h.classes for h in cfg.model.tasks.values()] == [3, None, ORDER["age"]]
    assert load_data(cfg).tasks == {"mask": ["incorrect", "none", "wear"], **{k: ORDER[k] for k in ("gender", "age")}}


def test_task_classes_are_checked_against_the_data(manifest: Path, tmp_path: Path) -> None:
    """A name the column lacks, or a label the list lacks, is one line naming the task, the names and the fix."""

    def refusal(*overrides: str) -> str:
        with pytest.raises(ClassLabError) as caught:
            load_data(load_config(None, _overrides(manifest, tmp_path, *overrides)))
        return str(caught.value)

    where = f"column 'age' of {(manifest / 'train.csv').resolve()}"
    fix = 'list each class of the data once, in the order you want: model.tasks.age.classes=[30-60,<30,">=60"]'
    assert refusal('model.tasks.age.classes=[<30,30-59,">=60"]') == (
        f"model.tasks.age.classes does not match the data (not found in {where}: 30-59; found in {where} but not "
        f"in model.tasks.age.classes: 30-60); {fix}"
    )
    assert refusal("model.tasks.age.classes=[<30,30-60]") == (
        f"model.tasks.age.classes does not match the data (found in {where} but not in model.tasks.age.classes: "
        f">=60); {fix}"
    )
    assert refusal('model.tasks.age.classes=[<30,<30,30-60,">=60"]') == (
        "model.tasks.age.classes lists <30 twice; give each class once"
    )
    assert "column 'mask' of " in refusal("model.tasks.mask.classes=[Wear,none,incorrect]")
    assert ": Wear (only its case differs from wear); " in refusal("model.tasks.mask.classes=[Wear,none,incorrect]")
    # A count is checked as before, and a column of numbers takes its names as numbers: [0, 1] are '0' and '1'.
    with pytest.raises(ClassLabError, match=r"^model.tasks.age.classes=2 but column 'age' has 3 classes"):
        classlab.train(None, _overrides(manifest, tmp_path, "model.tasks.age.classes=2"), quiet=True)
    assert "not found in column 'sex' of " in refusal("model.tasks.gender.classes=[0,1]")
    assert not (tmp_path / "runs").exists()


def test_task_classes_config_errors_are_one_line(manifest: Path, tmp_path: Path) -> None:
    def refusal(*overrides: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(None, _overrides(manifest, tmp_path, *overrides))
        assert "\n" not in str(caught.value)
        return str(caught.value)

    takes = "takes the number of classes (2 or more) or their names in order, e.g. [<30, 30-59, 60+]"
    assert refusal("data.classes=[wear,none,incorrect]") == (
        "data.classes does not apply to task=multitask: each task has its own class order; give it as "
        "model.tasks.<task>.classes, e.g. model.tasks.mask.classes=[wear,none,incorrect]"
    )
    key = "config key 'model.tasks.age.classes'"
    assert (
        refusal("model.tasks.age.classes=<30,30-60")
        == f"{key} = '<30,30-60': {takes}; write the list in brackets: [<30,30-60]"
    )
    assert refusal("model.tasks.age.classes=1") == f"{key} = 1: {takes}"
    assert refusal("model.tasks.age.classes=[<30]") == f"{key} = ['<30']: {takes}; a task has at least 2 classes"
    assert refusal("model.tasks.age.classes={a: 1}") == f"{key} = a section: {takes}"
    assert refusal("model.tasks.age.classes=[yes,no]") == (
        f"{key} = [True, False]: True is not a class name: YAML reads yes/no/true/false/null and decimals as other "
        'values; quote such names, e.g. ["yes", "no", "1.5"]'
    )
    assert refusal("model.tasks={mask: [wear, none, incorrect], sex: {}}") == (
        "'model.tasks.mask' is a section, not a value: set one of its keys, e.g. "
        "model.tasks.mask.classes=[wear, none, incorrect] (its keys: classes, column, weight)"
    )
    # A later stage may not reorder a task's classes: classes.json and the heads are the first stage's.
    assert refusal("stages=[{}, {model.tasks.age.classes: [<30, 30-60, '>=60']}]").startswith(
        "stages[1]: model.tasks.age.classes=['<30', '30-60', '>=60'] where the run has 3: every stage trains"
    )


def test_task_class_order_reaches_the_run_predictions_eval_and_resume(manifest: Path, tmp_path: Path) -> None:
    overrides = _overrides(manifest, tmp_path, *ORDERED, "exp_name=ordered", "epochs=6", "data.batch_size=8")
    run = classlab.train(None, overrides, quiet=True)
    classes = json.loads((run.path / "classes.json").read_text())
    assert [classes[str(i)] for i in (0, 1, 17)] == [
        "mask=wear|gender=female|age=<30",
        "mask=wear|gender=female|age=30-60",
        "mask=incorrect|gender=male|age=>=60",
    ]
    tasks = json.loads((run.path / "tasks.json").read_text())["tasks"]
    assert {t["name"]: t["classes"] for t in tasks} == ORDER
    # Predictions name each task's class by the run's order: the argmax of the task head is that list's entry.
    files = sorted(manifest.glob("p*_*.png"))
    combined, per_task = classlab.load(run.path).task_probabilities(files)
    result = classlab.predict(run.path, files, tmp_path / "pred.csv")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert result.count == len(files) == len(rows) == 72
    for j, row in enumerate(rows):
        assert row["class"] == classes[str(int(combined[j].argmax()))]
        for t, name in enumerate(ORDER):
            assert row[f"{name}_class"] == ORDER[name][int(per_task[t][j].argmax())]
    # ... and the model learnt the targets in that order: the mask (the red channel) of the training images.
    truth = {r["path"]: r["mask"] for r in csv.DictReader(open(manifest / "train.csv"))}
    right = sum(row["mask_class"] == truth[Path(row["path"]).name] for row in rows)
    assert right >= 0.9 * len(rows), right
    # A submission's index is the combined class's place in classes.json.
    template = tmp_path / "info.csv"
    template.write_text("ImageID,ans\n" + "".join(f"{f.name},\n" for f in files[:6]))
    classlab.predict.write_submission(run.path, files[:6], template, tmp_path / "sub.csv")
    answers = [r["ans"] for r in csv.DictReader(open(tmp_path / "sub.csv"))]
    assert [classes[a] for a in answers] == [r["class"] for r in rows[:6]]
    # eval scores each task against its labels in the run's order (the same figures validation logged).
    summary = json.loads((run.path / "summary.json").read_text())
    metrics = classlab.evaluate(run.path, split="val")
    for t in ORDER:
        assert metrics["tasks"][t] == pytest.approx(summary[f"val/{t}/acc"], abs=1e-5)
    # An ensemble averages runs in one order: a run in natural order beside it is refused in one line.
    other = classlab.train(None, _overrides(manifest, tmp_path, "exp_name=natural", "epochs=1"), quiet=True)
    with pytest.raises(ClassLabError, match=r"different orders; .*same model.tasks \(each task's class order: "):
        classlab.load([run.path, other.path])
    # --resume with another order is refused, as for data.classes: the head's outputs mean the saved order.
    natural = 'model.tasks.age.classes=[30-60,<30,">=60"]'
    with pytest.raises(ClassLabError, match=r"^resume=True: model.tasks.age.classes was \['<30', '30-60', '>=60'\]"):
        classlab.train(None, [*overrides, natural, "epochs=4"], resume=True, quiet=True)
