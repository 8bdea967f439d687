"""The competition pipeline: class weights, focal loss, the balanced sampler, k-fold splits and runs with
out-of-fold predictions, macro-F1, ensembles, submission files and attention-only fusion."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classlab.data.loaders as loaders_module
from classlab.config import load_config
from classlab.data.sampler import BalancedMemoryLoader, BalancedSampler, balanced_draw
from classlab.data.splits import grouped_folds, make_split, stratified_folds
from classlab.engine.losses import balanced_weights, class_weight_tensor, focal_loss
from classlab.errors import ClassLabError, ConfigError
from tests.conftest import class_folder, make_image

# ---------------------------------------------------------------------------------------------
# Class weights and focal loss
# ---------------------------------------------------------------------------------------------


def test_balanced_weights_are_n_over_k_n_c() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    w = balanced_weights(labels, 3)
    assert torch.allclose(w, torch.tensor([100 / (3 * 50), 100 / (3 * 30), 100 / (3 * 20)]))
    # Every class carries the same total weight, and the weights average to 1 per image.
    assert torch.allclose(w * torch.bincount(labels), torch.full((3,), 100 / 3))
    assert float((w[labels]).mean()) == pytest.approx(1.0)
    # A class without training images gets 0 (not inf), and k counts the classes present.
    w = balanced_weights(torch.tensor([0, 0, 0, 2]), 3)
    assert w.tolist() == pytest.approx([4 / (2 * 3), 0.0, 4 / (2 * 1)])


def test_class_weight_map_and_unknown_class() -> None:
    w = class_weight_tensor({"black": 3.0}, [0, 1, 2], ["asian", "black", "white"])
    assert w.tolist() == [1.0, 3.0, 1.0]
    with pytest.raises(ConfigError, match="unknown class\\(es\\) blak; the classes are: asian, black, white"):
        class_weight_tensor({"blak": 3.0}, [0], ["asian", "black", "white"])
    assert class_weight_tensor(None, [0], ["a", "b"]) is None


def test_focal_gamma_zero_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    weight = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7])
    assert torch.allclose(focal_loss(logits, target, 0.0), F.cross_entropy(logits, target), atol=1e-6)
    assert torch.allclose(
        focal_loss(logits, target, 0.0, weight), F.cross_entropy(logits, target, weight=weight), atol=1e-6
    )
    # gamma > 0 shrinks every image's term by (1 - p_true)^gamma <= 1.
    assert focal_loss(logits, target, 2.0) < F.cross_entropy(logits, target)
    p = logits.softmax(1)[torch.arange(64), target]
    manual = ((1 - p) ** 2 * F.cross_entropy(logits, target, reduction="none")).mean()
    assert torch.allclose(focal_loss(logits, target, 2.0), manual, atol=1e-6)


def test_config_keys_and_ini_criterion(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.name=focal", "loss.focal_gamma=1.5", "loss.class_weights=balanced"])
    assert (cfg.loss.name, cfg.loss.focal_gamma, cfg.loss.class_weights) == ("focal", 1.5, "balanced")
    ini = tmp_path / "exp.ini"
    ini.write_text("[MODEL]\ncriterion = focal\n")
    assert load_config(ini).loss.name == "focal"
    with pytest.raises(ConfigError, match="data.fold needs data.folds"):
        load_config(None, ["data.fold=1"])
    with pytest.raises(ConfigError, match="data.fold=5 but data.folds=5: folds are 0..4"):
        load_config(None, ["data.folds=5", "data.fold=5"])
    with pytest.raises(ConfigError, match="need hard labels"):
        load_config(None, ["loss.name=focal", "aug.mixup_alpha=0.2"])


# ---------------------------------------------------------------------------------------------
# Balanced sampler
# ---------------------------------------------------------------------------------------------


def test_balanced_sampler_draws_classes_evenly() -> None:
    """Chi-square of the class counts in 10k draws against uniform, with classes 100:10:1 in the data."""
    labels = torch.tensor([0] * 10_000 + [1] * 1_000 + [2] * 100)
    drawn = labels[balanced_draw(labels, seed=0, epoch=0, n=10_000)]
    counts = torch.bincount(drawn, minlength=3).double()
    chi2 = float(((counts - 10_000 / 3) ** 2 / (10_000 / 3)).sum())
    assert chi2 < 13.8, counts  # p = 0.001 at 2 degrees of freedom
    plain = torch.bincount(labels[torch.randint(0, len(labels), (10_000,))], minlength=3).double()
    assert float(((plain - 10_000 / 3) ** 2 / (10_000 / 3)).sum()) > 1000  # the unbalanced draw fails it


def test_balanced_loader_identical_on_resume_and_split_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.arange(300, dtype=torch.uint8).repeat_interleave(3 * 4 * 4).view(300, 3, 4, 4)
    labels = torch.tensor([0] * 250 + [1] * 40 + [2] * 10)

    def epoch_batches(epoch: int) -> list[torch.Tensor]:
        loader = BalancedMemoryLoader(images, labels, 32, shuffle=True, drop_last=True, seed=7)
        loader.set_epoch(epoch)
        return [y for _, y in loader]

    first = [epoch_batches(e) for e in range(3)]
    resumed = epoch_batches(2)  # a fresh loader (a resumed process) at epoch 2
    assert all(torch.equal(a, b) for a, b in zip(first[2], resumed))
    assert not torch.equal(torch.cat(first[0]), torch.cat(first[1]))  # epochs differ
    # Under DDP each process takes every world_size-th draw of the same epoch: together the whole draw.
    sampler = BalancedSampler(labels, seed=7)
    sampler.set_epoch(1)
    monkeypatch.setattr(loaders_module, "_rank_world", lambda: (0, 2))
    rank0 = list(sampler)
    monkeypatch.setattr(loaders_module, "_rank_world", lambda: (1, 2))
    rank1 = list(sampler)
    whole = balanced_draw(labels, 7, 1).tolist()
    assert rank0 == whole[0::2] and rank1 == whole[1::2]


# ---------------------------------------------------------------------------------------------
# Folds
# ---------------------------------------------------------------------------------------------


def test_stratified_folds_disjoint_cover_and_stratified() -> None:
    rng = np.random.default_rng(0)
    labels = rng.choice(4, size=517, p=[0.6, 0.25, 0.1, 0.05])
    k = 5
    fold = stratified_folds(labels, k, seed=3)
    splits = [make_split(labels, val_fraction=0.1, seed=3, class_names=list("abcd"), folds=k, fold=i) for i in range(k)]
    vals = [set(s["val"]) for s in splits]
    assert sum(len(v) for v in vals) == len(labels) and set().union(*vals) == set(range(len(labels)))  # cover, disjoint
    for s in splits:
        assert not set(s["train"]) & set(s["val"]) and len(s["train"]) + len(s["val"]) == len(labels)
    for c in range(4):
        per_fold = np.bincount(fold[labels == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)  # stratified within one image a class
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    assert np.array_equal(fold, stratified_folds(labels, k, seed=3))  # seeded


def test_grouped_folds_keep_groups_whole() -> None:
    rng = np.random.default_rng(1)
    groups = np.repeat([f"person{i}" for i in range(60)], rng.integers(1, 8, size=60))
    labels = np.array([hash(g) % 3 for g in groups])
    fold = grouped_folds(labels, groups, 4, seed=0)
    for g in set(groups.tolist()):
        assert len(set(fold[groups == g].tolist())) == 1, g  # a person never in two folds
    assert set(fold.tolist()) == {0, 1, 2, 3}
    sizes = np.bincount(fold)
    assert sizes.min() > 0.6 * len(labels) / 4
    with pytest.raises(ClassLabError, match="data.folds=5 but data.group_column has only 3 group"):
        grouped_folds(np.zeros(6), ["a", "a", "b", "b", "c", "c"], 5, seed=0)


# ---------------------------------------------------------------------------------------------
# Runs: k-fold training, out-of-fold CSV, compare, ensembles, submission
# ---------------------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def _args(tmp: Path, root: Path, *extra: str) -> list[str]:
    return [
        "data.dataset=folder",
        f"data.root={root}",
        f"run.root={tmp / 'runs'}",
        f"data.cache_dir={tmp / 'cache'}",
        "model.layers=[8,p,16,p]",
        "data.batch_size=16",
        "epochs=2",
        "optim.lr=0.05",
        "trainer.progress=false",
        *extra,
    ]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The command line in this process (a subprocess would spend most of its time importing torch): (code, stderr)."""
    from classlab.cli import main

    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def kfold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-fold run with class weights, monitored by macro-F1."""
    from classlab.train import train

    tmp = tmp_path_factory.mktemp("kfold")
    root = class_folder(tmp / "colors", COLORS, 30, size=16)
    extra = ["exp_name=cv", "loss.class_weights=balanced", "trainer.monitor=val/f1", "data.folds=3"]
    train(None, _args(tmp, root, *extra), quiet=True)
    return tmp, root


def test_kfold_run_writes_folds_and_out_of_fold_csv(kfold: tuple[Path, Path]) -> None:
    tmp, root = kfold
    top = tmp / "runs" / "cv"
    assert sorted(p.name for p in top.iterdir() if p.is_dir()) == ["fold0", "fold1", "fold2"]
    with open(top / "oof.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Every training image exactly once, predicted by the fold that held it out.
    assert len(rows) == 90 and len({r["path"] for r in rows}) == 90
    assert sorted(int(r["index"]) for r in rows) == list(range(90))
    for i in range(3):
        split = json.loads((top / f"fold{i}" / "split.json").read_text())
        assert {int(r["index"]) for r in rows if r["fold"] == str(i)} == set(split["val"])
    summary = json.loads((top / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["oof_acc"] > 0.6  # colours: well above chance (1/3)
    assert len(summary["fold_f1"]) == 3 and summary["std_acc"] >= 0
    header = (top / "fold0" / "metrics.csv").read_text().splitlines()[0]
    assert "val/f1" in header.split(",")
    from classlab.compare import compare

    table = compare([str(top)], metrics=["best_val_acc", "best_val_f1"], plots=False)
    assert table.rows[-2]["run"] == "cv mean ± std (3 folds)"
    values = [r["best_val_acc"] for r in table.rows[:3]]
    assert table.rows[-2]["best_val_acc"] == f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    # Below it, the k-fold result proper: every training image scored by the fold that did not train on it.
    oof = f"acc {summary['oof_acc']:.4f}, macro-F1 {summary['oof_f1']:.4f}"
    assert table.rows[-1]["run"] == f"cv out-of-fold (all {summary['images']} training images): {oof}"


def test_ensemble_of_a_run_with_itself_equals_the_run(kfold: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    tmp, root = kfold
    from classlab.predict import predict

    run = tmp / "runs" / "cv" / "fold0"
    images = [root / "red" / "red1.png", root / "blue" / "blue2.png", root / "green" / "green3.png"]
    alone = predict(run, images, top=3)
    twice = predict([run, run], images, top=3)
    assert [r["class"] for r in alone] == [r["class"] for r in twice]
    # The probabilities come rounded to 6 decimals: two values equal to 1e-9 can round one unit apart.
    for a, b in zip(alone, twice):
        assert a["prob"] == pytest.approx(b["prob"], abs=1.5e-6)
        assert a["top2_prob"] == pytest.approx(b["top2_prob"], abs=1.5e-6)
    # The k-fold folder stands for its runs (on the command line only with --ensemble mean).
    out, folds = tmp / "ens.csv", str(tmp / "runs" / "cv")
    code, err = cli(capsys, "predict", folds, str(root / "red"), "--out", str(out))
    assert code == 2 and err == (
        f"error: '{folds}' is a k-fold folder (one run per fold): add --ensemble mean to average their probabilities\n"
    )
    code, err = cli(capsys, "predict", folds, str(root / "red"), "--ensemble", "mean", "--out", str(out), "--quiet")
    assert code == 0, err
    with open(out, newline="") as handle:
        assert [r["class"] for r in csv.DictReader(handle)].count("red") >= 25


def test_mismatched_class_maps_are_refused_by_name(kfold: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    tmp, root = kfold
    from classlab.train import train

    other = class_folder(tmp / "two", {"red": COLORS["red"], "blue": COLORS["blue"]}, 10, size=16)
    train(None, _args(tmp, other, "exp_name=two", "epochs=1"), quiet=True)
    a, b = tmp / "runs" / "cv" / "fold0", tmp / "runs" / "two"
    code, err = cli(capsys, "predict", str(a), str(b), str(root / "red"), "--ensemble", "mean", "--out", "x.csv")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: runs {a} and {b} have different class maps"), lines
    assert lines[0].endswith("an ensemble averages runs trained on the same classes")
    assert not Path("x.csv").exists()


def test_an_ensemble_of_runs_at_different_image_sizes(kfold: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    """Before: runs at 16 and 24 px were refused ('an ensemble needs one image size'); now the images are read at
    the larger size and the 16 px run sees them brought to its own, so each member scores as it does alone."""
    tmp, root = kfold
    from classlab.engine.ensemble import load_runs
    from classlab.evaluate import evaluate
    from classlab.predict import predict
    from classlab.train import train

    runs = []
    for size in (16, 24):
        train(None, _args(tmp, root, f"exp_name=size{size}", f"data.image_size={size}"), quiet=True)
        runs.append(tmp / "runs" / f"size{size}")
    assert load_runs(runs).image_size == 24 and load_runs(runs[::-1]).image_size == 24
    images = [root / "red" / "red1.png", root / "blue" / "blue2.png", root / "green" / "green3.png"]
    alone = [{r["path"]: r for r in predict(run, images, top=3)} for run in runs]
    for row in predict(runs, images, top=3):
        for k in range(1, 4):
            name = row["class"] if k == 1 else row[f"top{k}_class"]
            prob = row["prob"] if k == 1 else row[f"top{k}_prob"]
            mine = [_prob_of(one[row["path"]], name) for one in alone]
            assert prob == pytest.approx(sum(mine) / 2, abs=0.02), (row, mine)
    singles = [evaluate(run, split="val") for run in runs]
    both = evaluate(runs, split="val", report=True)
    assert both["images"] == singles[0]["images"] == singles[1]["images"] and both["members"] == [str(r) for r in runs]
    assert both["top1"] > 0.5  # three colour classes: chance is 1/3
    flipped = evaluate(runs[::-1], split="val", report=True)  # the 24 px run first: read at 24 px either way
    assert both["report"]["ece"] == pytest.approx(flipped["report"]["ece"], abs=1e-6)  # the same probabilities


def _prob_of(row: dict, name: str) -> float:
    for k in range(1, 4):
        if (row["class"] if k == 1 else row[f"top{k}_class"]) == name:
            return row["prob"] if k == 1 else row[f"top{k}_prob"]
    return 0.0


def test_submission_keeps_template_order_and_refuses_missing(
    kfold: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    tmp, root = kfold
    run = str(tmp / "runs" / "cv" / "fold1")
    ids = ["blue/blue4.png", "red1.png", "green7.png", "red/red2.png", "blue9.png"]
    template = tmp / "info.csv"
    template.write_text("ImageID,ans\n" + "".join(f"{i},\n" for i in ids))
    out = tmp / "submission.csv"
    args = ["predict", run, str(root), "--template", str(template), "--out", str(out)]
    code, err = cli(capsys, *args, "--label-format", "name")
    assert code == 0, err
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["ImageID"] for r in rows] == ids  # the template's own order, each row once
    assert [r["ans"] for r in rows] == ["blue", "red", "green", "red", "blue"]
    classes = json.loads((Path(run) / "classes.json").read_text())
    assert cli(capsys, *args)[0] == 0  # --label-format index (the default)
    with open(out, newline="") as handle:
        assert [classes[r["ans"]] for r in csv.DictReader(handle)] == ["blue", "red", "green", "red", "blue"]
    # A template from a spreadsheet set to German or French: read and written with its semicolons.
    template.write_text("ImageID;ans;Usage\n" + "".join(f"{i};;Public\n" for i in ids))
    assert cli(capsys, *args, "--label-format", "name")[0] == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "ImageID;ans;Usage" and lines[1] == "blue/blue4.png;blue;Public", lines
    # A column name that differs only in case: named, nothing written.
    out.unlink()
    code, err = cli(capsys, *args, "--id-column", "imageid")
    assert (
        code == 1
        and err == f"error: {template}: no column 'imageid' (--id-column); did you mean --id-column 'ImageID'?\n"
    )
    code, err = cli(capsys, *args, "--label-column", "Ans")
    assert (
        code == 1
        and err == f"error: {template}: no column 'Ans' (--label-column); did you mean --label-column 'ans'?\n"
    )
    assert not out.exists()
    # A missing image and an unreadable one: listed, nothing written, unless allowed.
    extra = tmp / "extra"
    extra.mkdir()
    (extra / "broken.png").write_bytes(b"not an image")
    template.write_text("ImageID,ans\nred1.png,\nnothere.png,\nbroken.png,\n")
    out2 = tmp / "sub2.csv"
    args = ["predict", run, str(root), str(extra), "--template", str(template), "--out", str(out2)]
    code, err = cli(capsys, *args)
    assert code == 1 and not out2.exists()
    assert err.startswith("error: 2 template row(s) have no usable image; nothing written (add --allow-missing")
    assert "  nothere.png: no such image among the given paths\n" in err and "  broken.png: unreadable" in err
    code, err = cli(capsys, *args, "--allow-missing")
    assert code == 0, err
    with open(out2, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["ImageID"] for r in rows] == ["red1.png", "nothere.png", "broken.png"]
    assert rows[0]["ans"] != "" and rows[1]["ans"] == "" and rows[2]["ans"] == ""


def test_numbered_classes_need_a_label_format_for_a_submission(
    kfold: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Labels 1, 2, 10 in train.csv: the default --label-format index wrote 0 for the class '1' (a submission of
    wrong labels, exit code 0). Now it asks which; classes named by their own indices (0, 1, 2) keep the default."""
    import shutil

    tmp, root = kfold
    run = Path(shutil.copytree(tmp / "runs" / "cv" / "fold1", tmp_path / "numbered"))
    (run / "classes.json").write_text(json.dumps({"0": "1", "1": "2", "2": "10"}))
    template = tmp_path / "info.csv"
    template.write_text("ImageID,ans\nred1.png,\n")
    out = tmp_path / "submission.csv"
    args = ["predict", str(run), str(root), "--template", str(template), "--out", str(out)]
    code, err = cli(capsys, *args)
    assert code == 2 and not out.exists()
    assert err == (
        "error: the run's classes are numbers other than their indices (1 is 0, 2 is 1, 10 is 2): say which the "
        "submission holds, --label-format name (the numbers as in the training labels) or --label-format index\n"
    )
    assert cli(capsys, *args, "--label-format", "name")[0] == 0
    assert out.read_text().splitlines()[1] in ("red1.png,1", "red1.png,2", "red1.png,10")
    (run / "classes.json").write_text(json.dumps({"0": "0", "1": "1", "2": "2"}))
    assert cli(capsys, *args)[0] == 0
    from classlab.cli import _numbered_classes

    (tmp_path / "model.onnx").write_bytes(b"")  # an exported file carries its classes itself: not looked into here
    assert _numbered_classes(str(tmp_path / "model.onnx")) is None


def test_submission_ids_without_extension_and_ambiguous_ones(tmp_path: Path) -> None:
    """Kaggle's ids are often file names without .jpg; an id two files answer to is refused, not guessed."""
    from classlab.predict import index_images

    for rel in ("test/0a1b.jpg", "test/sub/7f.png", "test/dup.jpg", "test/dup.png", "other/x.jpg"):
        make_image(tmp_path / rel, (10, 20, 30), size=8)
    index = index_images([tmp_path / "test", tmp_path / "other" / "x.jpg"])
    assert index["0a1b"] == index["0a1b.jpg"] == tmp_path / "test" / "0a1b.jpg"
    assert index["7f"] == index["sub/7f"] == index["sub/7f.png"] == tmp_path / "test" / "sub" / "7f.png"
    assert index["x"] == tmp_path / "other" / "x.jpg" and index["dup.png"] == tmp_path / "test" / "dup.png"
    assert index["dup"] == [tmp_path / "test" / "dup.jpg", tmp_path / "test" / "dup.png"]


def test_eval_ensemble_and_macro_f1(kfold: tuple[Path, Path]) -> None:
    tmp, root = kfold
    runs = [str(tmp / "runs" / "cv" / f"fold{i}") for i in range(3)]
    from classlab.evaluate import evaluate

    single = evaluate(runs[0], split="val")
    assert 0.0 <= single["f1"] <= 1.0
    with pytest.raises(ClassLabError, match="hold out different validation images"):
        evaluate(runs, split="val")
    same = evaluate([runs[0], runs[0]], split="val")
    assert same["top1"] == pytest.approx(single["top1"]) and same["f1"] == pytest.approx(single["f1"])
    assert same["members"] == [runs[0], runs[0]]


def test_a_second_kfold_call_keeps_its_folds_and_refuses_another_config(
    kfold: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    """Before: a second call with epochs=3 printed nothing, trained nothing and rewrote folds.json with epochs=3;
    a k-fold folder given to export, or --resume without --folds, said 'not a run folder'."""
    tmp, root = kfold
    top = tmp / "runs" / "cv"
    folds_json = (top / "folds.json").read_bytes()
    base = ["train", *_args(tmp, root, "exp_name=cv", "loss.class_weights=balanced", "trainer.monitor=val/f1")]
    code, err = cli(capsys, *base, "data.folds=3", "epochs=3")
    assert code == 1 and err.startswith(f"error: '{top}' holds k-fold runs trained with epochs=2, here 3;")
    assert (top / "folds.json").read_bytes() == folds_json
    code, err = cli(capsys, *base, "--resume")
    assert code == 1 and err == f"error: '{top}' is a k-fold folder; continue it with --folds 3 (or data.folds=3)\n"
    from classlab.cli import main

    assert main([*[a for a in base if a != "--quiet"], "data.folds=3"]) == 0  # each fold kept: the figures said
    out = capsys.readouterr().out.splitlines()
    summary = json.loads((top / "summary.json").read_text())
    assert out[-2] == (
        f"3 folds: out-of-fold accuracy {summary['oof_acc']:.4f}, macro-F1 {summary['oof_f1']:.4f}; per fold "
        f"{summary['mean_acc']:.4f} ± {summary['std_acc']:.4f}"
    )
    assert out[-1] == f"k-fold folder: {top} (oof.csv: each image's out-of-fold prediction)"
    code, err = cli(capsys, "export", str(top))
    assert code == 1 and "is a k-fold folder (one run per fold), not one run; give a fold run" in err
    # --split val, the single run's hint, is refused for fold runs: an ensemble without a test set names a test set.
    code, err = cli(capsys, "eval", str(top), "--ensemble", "mean")
    assert code == 1 and err.startswith("error: the ensemble's runs have no test images") and "--split val" not in err
    # best_epoch is the epoch of best.ckpt (by trainer.monitor=val/f1), not of the best val/acc.
    from classlab.run import safe_torch_load

    for i in range(3):
        fold = top / f"fold{i}"
        summary = json.loads((fold / "summary.json").read_text())
        assert safe_torch_load(fold / "checkpoints" / "best.ckpt")["epoch"] + 1 == summary["best_epoch"]


def test_a_kfold_call_refused_for_its_data_leaves_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: a refused manifest or class folder left runs/<exp>/ with folds.json and a summary saying 'running',
    which compare and train then read as a run that was cut off; with --force the old k-fold folder was moved
    aside first and stayed aside (a single run refused for its data keeps its old folder in place)."""
    root = class_folder(tmp_path / "colors", COLORS, 4, size=8)
    (root / "red" / "notes.txt").write_text("not an image")
    code, err = cli(capsys, "train", *_args(tmp_path, root, "exp_name=cvbad"), "--folds", "2")
    assert code == 1 and "notes.txt: not an image file" in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    old = tmp_path / "runs" / "cvbad"
    old.mkdir(parents=True)
    (old / "folds.json").write_text('{"folds": 2}')  # stands for a finished k-fold folder
    code, err = cli(capsys, "train", *_args(tmp_path, root, "exp_name=cvbad"), "--folds", "2", "--force")
    assert code == 1 and "notes.txt: not an image file" in err
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["cvbad"] and (old / "folds.json").is_file()
    # A folder made by hand for it stays, as empty as it was: the k-fold run took it, and gives it back.
    mine = tmp_path / "runs" / "mine"
    mine.mkdir()
    code, err = cli(capsys, "train", *_args(tmp_path, root, "exp_name=mine"), "--folds", "2")
    assert code == 1 and "notes.txt: not an image file" in err
    assert mine.is_dir() and list(mine.iterdir()) == []


def test_a_fold_killed_between_its_config_and_its_summary_is_continued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Before: fold 0 killed after its config.yaml and before its summary.json (while its model was built) was
    refused by the next call on the k-fold folder: "run folder '.../fold0' already exists; use --resume to continue
    it", where --resume said the same; a single run in that state resumes. Now the call continues it (over, since it
    had trained nothing) and the folds after it."""
    from classlab.run import LOCK
    from classlab.train import train
    from tests.faults import Killed, dead_lock, killed_before_summary

    root = class_folder(tmp_path / "colors", COLORS, 8, size=8)
    args = _args(tmp_path, root, "exp_name=cv", "epochs=1")
    killed_before_summary(monkeypatch, "fold0")
    with pytest.raises(Killed):
        train(None, [*args, "data.folds=2"], quiet=True)
    monkeypatch.undo()
    top, fold0 = tmp_path / "runs" / "cv", tmp_path / "runs" / "cv" / "fold0"
    assert sorted(p.name for p in fold0.iterdir()) == ["classes.json", "config.yaml", "split.json"]
    dead_lock(top)
    dead_lock(fold0)
    shutil.copytree(top, tmp_path / "runs" / "cv2")
    # The same command again, and --resume (of a copy): each continues the k-fold folder and its fold 0.
    for name, flags in (("cv", []), ("cv2", ["exp_name=cv2", "--resume"])):
        top = tmp_path / "runs" / name
        code, err = cli(capsys, "train", *args, "--folds", "2", *flags)
        assert code == 0, err
        assert err.count("which is no longer running") == 2  # the killed process's locks, of the folder and fold 0
        for folder in (top / "fold0", top / "fold1", top):
            assert json.loads((folder / "summary.json").read_text())["status"] == "finished"
        assert (top / "oof.csv").is_file() and not list(top.rglob(LOCK))


def test_submission_ids_in_another_unicode_form_windows_paths_and_blank_rows(
    kfold: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: an id typed 'rosé' (composed) and the same file name stored decomposed (unzipped from a Mac) was
    'no such image' under a name that looked exactly like the file's; 'sub\\x.png' was not found; a blank row was
    listed as ': no such image'."""
    import unicodedata

    kf, _ = kfold
    images = tmp_path / "test"
    make_image(images / unicodedata.normalize("NFD", "rosé.png"), (200, 30, 30), size=16)
    make_image(images / "sub" / "x.png", (30, 30, 200), size=16)
    template = tmp_path / "info.csv"
    template.write_text("ImageID,ans\nrosé,\nsub\\x.png,\n", encoding="utf-8")
    out = tmp_path / "sub.csv"
    args = ["predict", str(kf / "runs" / "cv" / "fold0"), str(images), "--template", str(template), "--out", str(out)]
    code, err = cli(capsys, *args, "--label-format", "name")
    assert code == 0, err
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    from classlab.predict import predict

    by_name = {unicodedata.normalize("NFC", Path(r["path"]).stem): r["class"] for r in predict(args[1], [images])}
    assert [r["ImageID"] for r in rows] == ["rosé", "sub\\x.png"]
    assert [r["ans"] for r in rows] == [by_name["rosé"], by_name["x"]]
    template.write_text("ImageID,ans\nrosé,\n,\n", encoding="utf-8")
    code, err = cli(capsys, *args)
    assert code == 1 and err.endswith("\n  (empty id): a row without an id\n"), err


def test_submission_ids_with_the_extension_in_another_case_and_repeated_ids(
    kfold: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Before: 'IMG_1.JPG' in the template beside the file IMG_1.jpg was 'no such image', and a template naming
    one image on two rows was filled without a word."""
    kf, _ = kfold
    images = tmp_path / "test"
    make_image(images / "IMG_1.jpg", (200, 30, 30), size=16)
    make_image(images / "花.JPG", (30, 30, 200), size=16)
    make_image(images / "two.jpg", (30, 200, 30), size=16)
    make_image(images / "two.JPG", (30, 200, 30), size=16)
    template = tmp_path / "info.csv"
    template.write_text("ImageID,ans\nIMG_1.JPG,\n花.jpg,\n花.jpg,\n", encoding="utf-8")
    out = tmp_path / "sub.csv"
    args = ["predict", str(kf / "runs" / "cv" / "fold0"), str(images), "--template", str(template), "--out", str(out)]
    code, err = cli(capsys, *args)
    assert code == 0, err
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    assert [r["ImageID"] for r in rows] == ["IMG_1.JPG", "花.jpg", "花.jpg"] and all(r["ans"] for r in rows)
    assert "note: 1 id(s) appear on more than one template row: 花.jpg (2 rows)" in err
    template.write_text("ImageID,ans\ntwo.Jpg,\n", encoding="utf-8")  # two files answer to it: not guessed
    code, err = cli(capsys, *args)
    assert code == 1 and "two.Jpg: no such image among the given paths" in err


# ---------------------------------------------------------------------------------------------
# Attention-only fusion
# ---------------------------------------------------------------------------------------------


def test_attention_only_fusion_predicts_from_fused_features() -> None:
    from classlab.data.tasks import TaskLayout
    from classlab.models import build_model
    from classlab.models.multitask import MultiTaskNet, _drop_classifier, joint_log_probs

    layout = TaskLayout(("a", "b"), ("a", "b"), (("x", "y"), ("p", "q", "r")), (1.0, 1.0))
    backbone = build_model({"name": "cnn", "layers": [8, "p"]}, 2, 3, 8)
    _drop_classifier(backbone)
    torch.manual_seed(0)
    both = MultiTaskNet(backbone, layout, "attention")
    only = MultiTaskNet(backbone, layout, "attention_only")
    x = torch.randn(4, 3, 8, 8)
    tasks, combined = both.forward_tasks(x)
    assert torch.allclose(combined, joint_log_probs(tasks))  # the correction starts at zero
    tasks, combined = only.forward_tasks(x)
    assert combined.shape == (4, 6)
    assert not torch.allclose(combined.log_softmax(1), joint_log_probs(tasks), atol=1e-3)
    hidden = torch.stack([h(backbone.forward_features(x)) for h in only.hidden], 1)
    assert torch.allclose(combined, only.fusion(hidden))  # from the fused task features alone


def test_folds_refuse_more_than_one_process() -> None:
    """DDP re-launches the whole command: the second process of a k-fold run followed fold 0's folder into fold 1
    and the out-of-fold step failed; refused before anything is written, a single fold under DDP still allowed."""
    with pytest.raises(ConfigError, match=r"data.folds trains its 5 folds one after another.*data.fold=0"):
        load_config(None, ["data.folds=5", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"data.folds trains its 3 folds"):
        load_config(None, ["data.folds=3", "trainer.num_nodes=2"])
    assert load_config(None, ["data.folds=5", "data.fold=1", "trainer.devices=2"]).data.fold == 1
    assert load_config(None, ["data.folds=5", "trainer.devices=1"]).data.folds == 5
