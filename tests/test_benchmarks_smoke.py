"""Smoke versions of the benchmarks: a few steps each on a small copy of cifar10-jpeg.

They check that the benchmarks run end to end and write the fields BENCHMARKS.md is made from;
the figures themselves come from the full runs (commands in benchmarks/README.md).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg"
needs_data = pytest.mark.skipif(not (DATA / "train").is_dir(), reason="../shared/data/cifar10-jpeg is not here")


def _script(name: str) -> ModuleType:
    """A benchmark script as a module, so its main() runs in this process (no extra interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def _main_or_skip_without_airbench(bench: ModuleType, argv: list[str]) -> int:
    """``bench.main(argv)``, skipping the test where airbench cannot be installed (no sdist, no index)."""
    try:
        return bench.main(argv)
    except SystemExit as exc:
        if "could not install" in str(exc):
            pytest.skip("airbench 0.1.8 is not installable here (no sdist in /tmp/ab and no index)")
        raise


@needs_data
def test_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    bench = _script("throughput")
    assert bench.main(["--smoke", "--models", "fastnet", "--rounds", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    row = res["models"]["fastnet"]
    for key in ("a_user_script", "b_classlab", "c_model_alone", "b_classlab_bf16", "c_model_alone_bf16"):
        assert row[key] > 0
    # (b) and (c) alternate: one ratio per round, each figure the median of its rounds
    assert len(row["rounds_b_over_c"]) == 2 and len(row["rounds_b_over_c_bf16"]) == 2
    assert "fastnet: (b)/(c) round by round: fp32 " in bench.markdown(res)
    assert row["train_gflop_per_image"] == pytest.approx(0.708, rel=0.01)  # fwd + bwd of fastnet at 32 px
    assert res["matmul_gflops"]["fp32"] > 0 and "cores" in res["machine"] and res["command"].startswith("python")


FLOWERS = REPO.parent / "shared" / "data" / "flowers5"
MOBILENET = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet.pth"


@pytest.mark.skipif(not FLOWERS.is_dir(), reason="../shared/data/flowers5 is not here")
def test_throughput_photos_smoke(tmp_path: Path) -> None:
    """The photo workload: torchvision's model at 224 px from a flat class folder, all three paths."""
    out = tmp_path / "throughput.json"
    bench = _script("throughput")
    assert bench.main(["--workload", "photos", "--smoke", "--models", "mobilenet_v2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["workload"] == "photos" and res["settings"]["image_size"] == 224
    row = res["models"]["mobilenet_v2"]
    for key in ("a_user_script", "b_classlab", "c_model_alone", "b_classlab_bf16", "c_model_alone_bf16"):
        assert row[key] > 0
    assert row["train_gflop_per_image"] == pytest.approx(1.797, rel=0.01)  # 3 x forward (0.30 GMAC = 0.60 GFLOP)
    assert "photos at 224 px" in bench.markdown(res) and "goal is >= 0.95" in bench.markdown(res)
    assert bench.main(["--workload", "photos", "--models", "resnet20", "--data", str(FLOWERS), "--smoke"]) != 0


@needs_data
def test_vs_airbench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    bench = _script("vs_airbench")
    assert _main_or_skip_without_airbench(bench, ["--smoke", "--work", str(work)]) == 0
    results = json.loads((work / "results.json").read_text())
    for side in ("airbench", "airbench-bf16", "classlab", "classlab-muon"):
        r = results[side]["0"]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["wall_s"] > 0 and r["epochs"]
    assert "cifar10_fast_muon_seed0" in results["classlab-muon"]["0"]["run"]
    # a second call finds both sides done and only reports (resumable per side and seed); an override
    # (a lever on its own) is a side of its own
    assert bench.main(["--smoke", "--work", str(work), "--sides", "classlab", "--set", "trainer.test_tta=flip"]) == 0
    assert "done earlier" not in capsys.readouterr().out
    assert bench.main(["--smoke", "--work", str(work), "--sides", "classlab"]) == 0
    assert "done earlier" in capsys.readouterr().out
    results = json.loads((work / "results.json").read_text())
    table = bench.markdown(results, {"date": "d", "machine": "m", "command": "c"})
    own = "bf16 weights and inputs, BatchNorm fp32"
    assert f"| airbench-bf16 | {bench.SMOKE_FP32.format(own) if bench.smoke_in_fp32(True) else own} | 0 |" in table
    assert results["airbench"]["0"]["smoke_fp32"] is False  # the fp32 side is fp32 anyway
    assert "classlab / airbench wall time:" in table and "classlab-muon / airbench-bf16 wall time:" in table
    assert "classlab [trainer.test_tta=flip] / airbench wall time:" in table
    assert "Headline, classlab-muon against the faster airbench" in table
    # the table is rewritten by the last call, but each row keeps the call (and date) that measured it
    # (here every call is this test's process, so the note names pytest's command line)
    assert re.search(r"- rows measured by: `python [^`]+pytest[^`]*` \(\d{4}-\d\d-\d\d \d\d:\d\d", table)
    # the same weights tested with 10, 6 and 2 views
    views = _script("tta_views")
    run = results["classlab"]["0"]["run"]
    assert views.main(["--runs", run, "--smoke"]) == 0
    measured = {run: views.measure(Path(run), views.MODES)}
    assert {m: v["views"] for m, v in measured[run].items()} == {"flip,translate": 10, "flip,diagonal": 6, "flip": 2}
    table = views.markdown(measured, {"date": "d", "machine": "m", "command": "c"})
    assert "| flip,diagonal | 6 |" in table and "| flip,translate | 10 |" in table


@pytest.mark.slow  # 90 s of profiling on 2 cores; vs_airbench's smoke runs both sides in the default suite
@needs_data
def test_step_profile_smoke(tmp_path: Path) -> None:
    """Both sides' steps timed by the optimizer hook and profiled; the table has every group for both."""
    work = tmp_path / "work"
    bench = _script("step_profile")
    assert _main_or_skip_without_airbench(bench, ["--smoke", "--work", str(work)]) == 0
    summary = json.loads((work / "summary.json").read_text())
    for side in ("airbench-bf16", "classlab"):
        assert summary[side]["step_s"] > 0 and summary[side]["ops"]
        assert "convolutions" in summary[side]["groups"]
    table = bench.markdown(summary, {"date": "d", "machine": "m", "command": "c"}, 1, 3)
    assert "| step, s (median, unprofiled) |" in table and "classlab / airbench-bf16 per step:" in table
    assert ("fp32 in this smoke run: no bf16 instructions on this CPU" in table) == bench.smoke_in_fp32(True)


def test_recipes_figure_beside_another_recipe_reads_the_recorded_rows(tmp_path: Path) -> None:
    """The equal-steps figure draws the 60-epoch recipe's rows beside its own from results.json (their runs are in a
    work folder a checkout lacks); a row not run yet is left out, and a recipe set beside none draws nothing."""
    bench = _script("recipes")
    results = {
        "efficientnet_b0_equal_steps": [
            {"run": "images_per_class=5,epochs=2400,val_every=240", "pending": True},
            {"run": "images_per_class=40,epochs=400,val_every=40", "test_acc": 0.33},
            {"run": "images_per_class=70,epochs=240,val_every=24", "test_acc": 0.35},
        ],
        "efficientnet_b0_fewshot": [{"run": "images_per_class=5", "test_acc": 0.12}],
    }
    drawn: dict[str, list] = {}
    from matplotlib.axes import Axes

    original = Axes.plot

    def plot(ax: Axes, *args: object, **kwargs: object) -> object:
        drawn[str(kwargs.get("label"))] = list(args)
        return original(ax, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Axes, "plot", plot)
        path = bench.draw_beside("efficientnet_b0_equal_steps", results, tmp_path)
    assert path is not None and path.is_file() and path.read_bytes()[:4] == b"\x89PNG"
    assert drawn["efficientnet_b0_equal_steps"] == [(40, 70), (33.0, 35.0)]
    assert drawn["efficientnet_b0_fewshot"] == [(5,), (12.0,)]
    assert bench.draw_beside("stl10_2m", results, tmp_path / "none") is None


@needs_data
def test_recipes_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    bench = _script("recipes")
    assert bench.main(["--smoke", "--only", "stl10_2m", "--work", str(work)]) == 0
    rows = json.loads((work / "results.json").read_text())["stl10_2m"]
    # the recipe's two stages, each a row, at the scaled protocol's resolutions, under the 2M budget
    assert [r["image_size"] for r in rows] == [32, 48]
    assert all(r["params"] == 1_996_986 and r["model"] == "bottleneck_resnet" for r in rows)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows)
    assert "| preset=stl10_2m stage 2 | bottleneck_resnet | 1,996,986 | 1,996,986 | 48 |" in capsys.readouterr().out
    assert all(r["command"].startswith("python ") and r["date"] for r in rows)
    # a second call reads the finished run instead of training it again, and a row it only found keeps
    # the call that measured it; a row whose figures differ from the stored ones is stamped anew
    rows[0]["command"] = rows[1]["command"] = "python benchmarks/recipes.py --earlier-call"
    rows[1]["test_acc"] = -1.0
    (work / "results.json").write_text(json.dumps({"stl10_2m": rows}))
    assert bench.main(["--smoke", "--only", "stl10_2m", "--work", str(work)]) == 0
    out = capsys.readouterr().out
    assert "1 finished (skipped)" in out
    again = json.loads((work / "results.json").read_text())["stl10_2m"]
    assert again[0]["command"] == "python benchmarks/recipes.py --earlier-call"
    assert again[1]["command"] != "python benchmarks/recipes.py --earlier-call" and again[1]["test_acc"] >= 0.0
    note = out.split("Rows measured by: ", 1)[1].splitlines()[0]
    assert "`python benchmarks/recipes.py --earlier-call` (" in note and note.count("`") == 4  # both calls


@needs_data
def test_recipes_finished_only_tables_a_long_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep longer than a session is tabled as it stands: finished runs with figures, the rest as not run yet."""
    work = tmp_path / "work"
    bench = _script("recipes")
    # a long recipe's runs live in the committed long_runs folder, so a fresh checkout continues them
    assert bench._root("efficientnet_b0_equal_steps", work, smoke=False) == REPO / "benchmarks" / "long_runs"
    assert bench.RESULTS == REPO / "benchmarks" / "results" / "recipes.json"
    argv = ["--smoke", "--only", "efficientnet_b0_equal_steps", "--work", str(work)]
    assert bench.main([*argv, "--finished-only"]) == 0
    out = capsys.readouterr().out
    assert "0 of 2 runs finished; not run yet: images_per_class=5,epochs=2, images_per_class=10,epochs=2" in out
    assert not (work / "runs" / "efficientnet_b0_equal_steps").exists()  # nothing was started
    assert bench.main(argv) == 0
    runs = work / "runs" / "efficientnet_b0_equal_steps"
    (runs / "images_per_class=10,epochs=2" / "summary.json").unlink()  # as a run killed before it finished
    capsys.readouterr()
    assert bench.main([*argv, "--finished-only"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 runs finished; not run yet: images_per_class=10,epochs=2" in out
    assert "| images_per_class=5,epochs=2 | efficientnet_b0 | 4,020,358 |" in out
    assert "| images_per_class=10,epochs=2 | not run yet |" in out
    rows = json.loads((work / "results.json").read_text())["efficientnet_b0_equal_steps"]
    assert rows[1] == {"run": "images_per_class=10,epochs=2", "pending": True}
    assert "--finished-only" not in rows[0]["command"]  # the row names the command that trains that folder


@pytest.mark.skipif(not (FLOWERS.is_dir() and MOBILENET.is_file()), reason="../shared flowers5 or weights not here")
def test_vs_fastai_smoke_classlab_side(tmp_path: Path) -> None:
    """The classlab side of both arms on a small copy (fastai is not installed in CI: its side is skipped)."""
    work = tmp_path / "work"
    bench = _script("vs_fastai")
    assert bench.main(["--smoke", "--sides", "classlab", "--work", str(work), "--threads", "1"]) == 0
    results = json.loads((work / "results.json").read_text())
    split = json.loads((work / "split.json").read_text())
    assert len(split["val"]) == 10 and len(split["train"]) == 50  # 20% of 12 a class, stratified: 2 a class
    assert not set(split["val"]) & set(split["train"])
    for arm in ("finetune", "scratch"):
        r = results[arm]["classlab"]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["wall_s"] > 0 and r["size"] == 64 and r["epochs"] == 2
    table = bench.markdown(results, {"date": "d", "machine": "m", "command": "c"})
    assert table.count("| classlab |") == 2 and "| fastai |" not in table
    assert re.search(r"- rows measured by: `python [^`]+pytest[^`]*` \(\d{4}-\d\d-\d\d \d\d:\d\d", table)


@needs_data
def test_recipes_smoke_rotation_transfer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The EfficientNet arm: the pretext run's weights reach the transfer runs, whose rebuilt neck trains."""
    work = tmp_path / "work"
    bench = _script("recipes")
    arms = ["effb0_rotation", "effb0_rotation_transfer", "effb0_rotation_transfer_epoch5", "effb0_random_transfer"]
    assert bench.main(["--smoke", "--only", *arms, "--work", str(work)]) == 0
    results = json.loads((work / "results.json").read_text())
    assert [r["run"] for r in results["effb0_rotation"]] == ["name=efficientnet_b0"]
    runs = work / "runs" / "effb0_rotation_transfer"
    cut = json.loads((runs / "truncate_at=3,head_conv=true" / "summary.json").read_text())
    full = json.loads((runs / "truncate_at=16,head_conv=false" / "summary.json").read_text())
    assert cut["params_trainable"] == (24 * 1280 + 2 * 1280) + (1280 * 10 + 10)  # the new 1x1 conv + BN, then fc
    assert full["params_trainable"] == 320 * 10 + 10  # frozen B0, a linear head on its 320 channels
    config = (runs / "truncate_at=3,head_conv=true" / "config.yaml").read_text()
    assert str(work / "runs" / "effb0_rotation" / "name=efficientnet_b0") in config
    # the early-checkpoint runs name a checkpoint of the pretext run (--smoke: last; the real one: epoch5)
    early = work / "runs" / "effb0_rotation_transfer_epoch5" / "truncate_at=16,head_conv=true" / "config.yaml"
    assert f"{work / 'runs' / 'effb0_rotation' / 'name=efficientnet_b0'}:last" in early.read_text()
    runs_early = [r["run"] for r in results["effb0_rotation_transfer_epoch5"]]
    assert runs_early == ["truncate_at=16,head_conv=true", "truncate_at=16,head_conv=false"]
    # the arm's figure: test accuracy against the cut, a line with and one without the conv head
    figure = work / "figures" / "effb0_rotation_transfer" / "test_acc_vs_model_truncate_at.png"
    assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG"
    table = (figure.parent / "compare.md").read_text()
    assert "truncate_at=3,head_conv=true" in table and "truncate_at=16,head_conv=false" in table
    out = capsys.readouterr().out
    assert f"![test accuracy, effb0_rotation_transfer]({figure})" in out
    # the control's figure draws its random-weight runs beside the rotation-initialised ones
    control = (work / "figures" / "effb0_random_transfer" / "compare.md").read_text().splitlines()
    assert sum("| 3 |  | True |" in row for row in control) == 1  # init_from none: an empty cell
    assert sum(f"| 3 | {work / 'runs' / 'effb0_rotation' / 'name=efficientnet_b0'} | True |" in r for r in control) == 1
    assert "![test accuracy, effb0_random_transfer](" in out


def test_precision_cpu_smoke(tmp_path: Path) -> None:
    """bf16 against fp32 a step: rows kept per machine, so a second machine's call adds to the table."""
    bench = _script("precision_cpu")
    work = tmp_path / "work"
    store = work / "results.json"
    store.parent.mkdir(parents=True)
    other = {"net": "normal_cnn", "batch": 128, "fp32_s": 0.5, "bf16_s": 0.25, "command": "python x", "date": "d"}
    store.write_text(json.dumps({"an AMX machine": {"bf16_isa": "amx_bf16", "rows": [other]}}))
    assert bench.main(["--smoke", "--work", str(work)]) == 0
    results = json.loads(store.read_text())
    assert set(results) == {"an AMX machine", bench.machine()}  # the earlier machine's rows are kept
    row = results[bench.machine()]["rows"][0]
    assert row["net"] == "resnet_cifar depth 20" and row["fp32_s"] > 0 and row["bf16_s"] > 0
    table = bench.markdown(results)
    assert "| an AMX machine | amx_bf16 | normal_cnn | 128 | 0.500 | 0.250 | 0.50x |" in table
    assert f"| {bench.machine()} |" in table and "| resnet_cifar depth 20 | 4 |" in table


def test_measured_by_names_a_command_once_with_each_date() -> None:
    """A long sweep finished across sessions: one command, several dates; two commands stay two."""
    common = _script("_common")
    rows = [
        {"command": "python benchmarks/recipes.py --only a", "date": "2026-12-03 23:21 UTC"},
        {"command": "python benchmarks/recipes.py --only a", "date": "2026-12-04 02:57 UTC"},
        {"command": "python benchmarks/recipes.py --only a", "date": "2026-12-04 02:57 UTC"},
        {"command": "python benchmarks/recipes.py --only b", "date": "2026-12-01 10:00 UTC"},
        {"pending": True},
    ]
    assert common.measured_by(rows) == [
        "rows measured by: `python benchmarks/recipes.py --only a` (2026-12-03 23:21 UTC, 2026-12-04 02:57 UTC); "
        "`python benchmarks/recipes.py --only b` (2026-12-01 10:00 UTC)"
    ]
