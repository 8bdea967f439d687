"""Measured figures for the recipes in configs/, on cifar10-jpeg, at a length this machine can afford.

    python benchmarks/recipes.py                        # every recipe; BENCHMARKS.md section "recipes"
    python benchmarks/recipes.py --only resnet32 stl10_2m
    python benchmarks/recipes.py --smoke                # 2 steps a run on a small copy; no BENCHMARKS.md

A recipe ships with its published schedule; two CPU cores cannot run most of them in a session, so
each one here runs a *scaled* schedule that keeps the published shape (where the learning rate drops,
how the stages split) and says exactly what it changed. Each recipe runs as a classlab sweep, so a
second call reads finished runs instead of repeating them and resumes an interrupted one from its
``last.ckpt``. The time per epoch is the run's own clock (training plus its validations) divided by
its epochs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    DEFAULT_DATA,
    REPO,
    WORK,
    command,
    machine,
    measured_by,
    publish,
    results_path,
    subset_folder,
    today,
)

from classlab.run import atomic_write_text  # noqa: E402

CONFIGS = REPO / "configs"
FIGURES = REPO / "benchmarks" / "figures"  # committed: the recipes section of BENCHMARKS.md shows them
RESULTS = results_path("recipes", WORK, local=False)
LONG_RUNS = REPO / "benchmarks" / "long_runs"  # committed run folders: a sweep longer than a session (README there)
BF16 = "trainer.precision=bf16-mixed"  # 1.7-1.8x on this CPU's AVX512-BF16 (BENCHMARKS.md, fast-knobs)
# cheapest first, so a session that cannot run them all finishes whole runs: on 2 AVX2 cores in fp32 an epoch
# takes 1.4 / 0.4 / 1.4 / 3.8 / 18 / 32 min (patch-2 mixers: 256 tokens)
TEMPLATE_MODELS = "model.name=normal_cnn,residual_cnn,mixer_s4,mixer_b4,mixer_s2,mixer_b2"


@dataclass(frozen=True)
class Recipe:
    """A recipe's scaled run: its config, what the scaling overrides, and the sweep grid."""

    config: str
    overrides: list[str]
    grid: list[str]
    scaled: str  # what differs from the published schedule, in words
    smoke: list[str] = field(default_factory=list)  # extra overrides for --smoke
    smoke_grid: list[str] | None = None  # --smoke's grid where the real one needs more images
    plot: tuple[str, ...] | None = None  # (x key, *line keys): test accuracy against x, a line per combination
    plot_with: tuple[str, ...] = ()  # other recipes whose runs the figure draws too (a control beside its arm)
    long_run: bool = False  # hours of runs: they live in LONG_RUNS, committed, so the next session continues them
    note: str = ""  # what the table alone would misstate (rows measured elsewhere, a run recorded short)
    beside: tuple[str, ...] = ()  # recipes whose recorded rows its figure of test accuracy against N draws too


RECIPES: dict[str, Recipe] = {
    "resnet32": Recipe(
        "cifar10_resnet32.yaml",
        ["epochs=30", "sched.milestones=[15,22.5]", BF16],
        ["model.depth=32"],
        "30 of 182 epochs, lr /10 at epochs 15 and 22.5 (the published drops at 50% and 75%), bf16 autocast",
    ),
    "stl10_2m": Recipe(
        "stl10_2m.yaml",
        [
            "data.images_per_class=500",
            "data.val_fraction=0.1",  # 5,000 validation images are plenty; 10,000 would cost 9 min more
            "data.image_size=32",
            "data.train_source_size=32",  # crops from CIFAR's 32 px originals, as the recipe's from STL-10's 96 px
            "epochs=90",
            "sched.restart_period=15",
            "stages=[{}, {epochs: 42, data.image_size: 48, optim.lr: 0.01, sched.name: cosine, "
            "sched.warmup_epochs: 0}]",
            BF16,
        ],
        ["model.preset=stl10_2m"],
        "STL-10's protocol on CIFAR-10: 500 labelled images a class, the stl10_2m net (under 2M parameters), "
        "both stages at 0.3 of their length: 90 epochs at 32 px with restarts every 15 (300 at 70 px every 50 "
        "in the recipe), then 42 epochs at 48 px (140 at 120 px), crops cut from the 32 px originals; bf16 autocast",
        ["stages=[{}, {data.image_size: 48}]"],
    ),
    "template_compare": Recipe(
        "cifar10_template_compare.yaml",
        ["epochs=6"],
        [TEMPLATE_MODELS],
        "6 of the source's 600 epochs (600 Adam steps at batch 500, constant lr, so only the length is cut) "
        "for each of the six models, fp32 as in the source",
        ["data.batch_size=20"],
        long_run=True,
    ),
    "template_compare_defaults": Recipe(
        "cifar10_template_compare.yaml",
        [
            "epochs=6",
            "aug.crop_padding=4",
            "aug.flip=true",
            "aug.norm_mean=null",
            "aug.norm_std=null",
            "data.val_fraction=0.1",
            "optim.decay_norm_and_bias=false",
        ],
        [TEMPLATE_MODELS],
        "the second table: classlab's defaults in place of the source's fixed setup (crop + flip, the training "
        "split's statistics, a 10% validation split picking best.ckpt, no decay on norms and biases), 6 epochs, fp32",
        ["data.batch_size=20"],
        long_run=True,
    ),
    "efficientnet_b0_fewshot": Recipe(
        "efficientnet_b0_fewshot.yaml",
        [BF16],
        ["data.images_per_class=5,10,20,30,40,50,60,70"],
        "the recipe's 60 epochs at 64 px (the source gives no epoch count), bf16 autocast",
        smoke_grid=["data.images_per_class=5,10"],
    ),
    "efficientnet_b0_equal_steps": Recipe(
        "efficientnet_b0_fewshot.yaml",
        [BF16],
        [
            "data.images_per_class,epochs,trainer.val_every=[5,2400,240],[10,2400,240],[20,800,80],[30,600,60],"
            "[40,400,40],[50,343,34],[60,267,27],[70,240,24]"
        ],
        "every N the same 2,400 RangerLars steps at batch 64 (epochs linked to N), bf16 autocast",
        smoke_grid=["data.images_per_class,epochs=[5,2],[10,2]"],
        long_run=True,
        note=(
            "N = 5 / 10 / 20 / 30 were measured on 2026-12-03 (AMD EPYC, bf16) in a work folder a fresh checkout "
            "does not have: 20.77 / 26.64 / 29.62 / 33.14% test, 25-34 min a run (configs/README.md); their rows "
            "read 'not run yet' until the command runs them again. N = 50 trained its 343 epochs; it ran before "
            "the last epoch was always validated, so its row shows its last validated epoch, 340."
        ),
        beside=("efficientnet_b0_fewshot",),
    ),
    "effb0_rotation": Recipe(
        "efficientnet_b0_rotation.yaml",
        ["epochs=10", "data.images_per_class=1000", BF16],
        ["model.name=efficientnet_b0"],
        "the pretext on 10,000 of the training images (1,000 a class, labels unused; 10% of them measure rotation "
        "accuracy) for 10 of the 100 epochs, cosine over those 10, bf16 autocast",
    ),
    "effb0_rotation_transfer": Recipe(
        "efficientnet_b0_fewshot.yaml",
        [
            "data.images_per_class=70",
            "epochs=60",
            "model.init_from=<runs>/effb0_rotation/name=efficientnet_b0",
            "model.freeze=all",
            BF16,
        ],
        ["model.truncate_at=3,5,11,16", "model.head_conv=true,false"],
        "the transfer arm at N = 70 a class: effb0_rotation's frozen features cut after block_op 2 / 4 / 10 / 15 "
        "(truncate_at 3 / 5 / 11 / 16), with and without the 1x1 conv head, the recipe's 60 epochs (600 steps), bf16",
        smoke_grid=["model.truncate_at,model.head_conv=[3,true],[16,false]"],
        plot=("model.truncate_at", "model.head_conv"),
    ),
    "effb0_rotation_transfer_epoch5": Recipe(
        "efficientnet_b0_fewshot.yaml",
        [
            "data.images_per_class=70",
            "epochs=60",
            "model.init_from=<runs>/effb0_rotation/name=efficientnet_b0:epoch5",
            "model.freeze=all",
            BF16,
        ],
        ["model.truncate_at,model.head_conv=[16,true],[16,false]"],
        "the source's early-checkpoint finding: the transfer at block_op 15 (all of B0), with and without the conv "
        "head, from effb0_rotation's epoch-5 checkpoint instead of its best (epoch 9), otherwise as "
        "effb0_rotation_transfer",
        smoke=["model.init_from=<runs>/effb0_rotation/name=efficientnet_b0:last"],  # 2 steps keep no epoch5
    ),
    "effb0_random_transfer": Recipe(
        "efficientnet_b0_fewshot.yaml",
        ["data.images_per_class=70", "epochs=60", "model.freeze=all", BF16],
        ["model.truncate_at=3,5,11,16", "model.head_conv=true,false"],
        "the transfer arm's control: the same frozen cuts and trained classifiers on a randomly initialised B0 "
        "(no pretext), so the figure shows what the rotation features add",
        smoke_grid=["model.truncate_at,model.head_conv=[3,true]"],
        plot=("model.truncate_at", "model.init_from", "model.head_conv"),
        plot_with=("effb0_rotation_transfer",),  # random (init_from none) beside rotation features
    ),
    "resnet32_seed": Recipe(
        "cifar10_resnet32_seed.yaml",
        ["epochs=30", "sched.milestones=[10.29,15.44]", BF16],
        ["model.depth=32"],
        "30 of the source's 239 epochs, lr /10 at 10.29 and 15.44 (its drops at 82 and 123 of 239), bf16 autocast",
    ),
}


def _data_overrides(data: Path) -> list[str]:
    return ["data.dataset=folder", f"data.root={data}", "trainer.progress=false"]


def run_recipe(name: str, data: Path, root: Path, smoke: bool, finished_only: bool = False) -> list[Any]:
    """Run (or continue) one recipe's sweep; return its points (``finished_only``: start none, read the folders)."""
    import classlab
    from classlab.cli import _quiet_libraries
    from classlab.sweep import plan

    _quiet_libraries()
    recipe = RECIPES[name]
    own = recipe.overrides
    if smoke:  # the wiring, in fp32: bf16 is emulated on a CPU without bf16 instructions, 12-41x slower a step
        own = [o for o in own if o != BF16]
        own = [*own, "trainer.max_steps=2", "epochs=1", "data.images_per_class=null", "data.val_fraction=0.2"]
        own += recipe.smoke
    own = [o.replace("<runs>", str(root)) for o in own]  # an earlier recipe's runs, e.g. its weights
    overrides = [*own, *_data_overrides(data), f"run.root={root}", f"exp_name={name}"]
    grid = recipe.smoke_grid if smoke and recipe.smoke_grid else recipe.grid
    if finished_only:
        return plan(str(CONFIGS / recipe.config), overrides, grid)[1]
    points = classlab.sweep(str(CONFIGS / recipe.config), grid, overrides, quiet=True)
    failed = [p.name for p in points if p.status != "finished"]
    if failed:
        raise SystemExit(f"recipe {name}: runs did not finish: {', '.join(failed)} (see their folders under {root})")
    return points


def draw(name: str, root: Path, out: Path) -> None:
    """The recipe's test accuracy against its plot's x key, a line per combination of the others (classlab compare)."""
    import classlab

    recipe = RECIPES[name]
    if recipe.plot is not None:
        x, *lines = recipe.plot
        runs = [str(root / r) for r in (name, *recipe.plot_with) if (root / r).is_dir()]
        classlab.compare(runs, by=[x, *lines], metrics=["test_acc"], out=out, x=x, group=lines)


def draw_beside(name: str, results: dict[str, list[dict[str, Any]]], out: Path) -> Path | None:
    """Test accuracy against images a class, a line for this recipe and each it is set beside, from the recorded
    rows (results.json) rather than run folders: the recipes beside it ran in a work folder a checkout lacks."""
    recipe = RECIPES[name]
    if not recipe.beside:
        return None
    from classlab.run import atomic_write_figure, new_figure

    fig, ax = new_figure(figsize=(6, 4))
    for key in (name, *recipe.beside):
        points = sorted(
            (int(m.group(1)), 100 * r["test_acc"])
            for r in results.get(key, [])
            if not r.get("pending") and (m := re.search(r"images_per_class=(\d+)", r["run"]))
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=key)
    ax.axhline(10, color="grey", linestyle=":", label="chance (10 classes)")
    ax.set(xlabel="training images a class (N)", ylabel="test accuracy (%)", title=f"{name} on cifar10-jpeg")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    path = out / "test_acc_vs_images_per_class.png"
    atomic_write_figure(path, fig, dpi=120, bbox_inches="tight")
    return path


def _epoch_seconds(run: Path) -> tuple[int, float]:
    """(epochs run, mean seconds per epoch including validation) from the run's metrics.csv clock."""
    path = run / "metrics.csv"
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))) if path.is_file() else []
    if not rows:  # stopped by max_steps before an epoch ended (smoke runs)
        return 0, float("nan")
    epochs = int(float(rows[-1]["epoch"]))
    return epochs, float(rows[-1]["time"]) / max(epochs, 1)


def pending(name: str) -> dict[str, Any]:
    """The row of a run the sweep has not finished: the table lists every run the recipe plans."""
    return {"run": name, "pending": True}


def measure(run: Path) -> list[dict[str, Any]]:
    """One row per stage of the run: accuracy, epochs, seconds per epoch, parameters."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    stages = sorted(run.glob("stage*/summary.json"))
    folders = [p.parent for p in stages] if stages else [run]
    rows = []
    for k, folder in enumerate(folders, 1):
        s = json.loads((folder / "summary.json").read_text(encoding="utf-8")) if stages else summary
        epochs, per_epoch = _epoch_seconds(folder)
        rows.append(
            {
                "run": run.name + (f" stage {k}" if stages else ""),
                "model": s.get("model"),
                "params": s.get("params"),
                "trainable": s.get("params_trainable"),
                "image_size": s.get("image_size"),
                "train_images": (s.get("images") or {}).get("train"),
                "epochs": epochs,
                "s_per_epoch": per_epoch,
                "best_val_acc": s.get("best_val_acc"),
                "test_acc": s.get("test_acc"),
            }
        )
    return rows


def _stamped(rows: list[dict[str, Any]], before: list[dict[str, Any]], call: str | None = None) -> list[dict[str, Any]]:
    """Rows with the call (and date) that measured them: a row that this call only found finished keeps its stamp.

    The section is rewritten by whichever call ran last, so its header names that call; each recipe's
    rows must still name the call that trained them (``call``: a --finished-only call names the command
    whose runs it tabled, which trains exactly those folders).
    """
    earlier = {r["run"]: r for r in before}
    stamp = {"command": call or command(), "date": today()}
    out = []
    for row in rows:
        if row.get("pending"):  # no figures, so no call made them
            out.append(row)
            continue
        old = earlier.get(row["run"], {})
        # NaN-safe; a column added since the row was stored does not make it new
        same = old and all(json.dumps(old[k]) == json.dumps(v) for k, v in row.items() if k in old)
        out.append({**row, **({k: old[k] for k in stamp if k in old} if same and "command" in old else stamp)})
    return out


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.2f}%"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"  # rows stored before the column was added


def _num(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: no epoch ended


def markdown(results: dict[str, list[dict[str, Any]]], data: Path, figures: dict[str, str] | None = None) -> str:
    lines = [
        "## Recipes on cifar10-jpeg, scaled to 2 CPU cores",
        "",
        f"- date: {today()}, machine: {machine()}",
        f"- command: `{command()}` (data: `{data}`)",
        "- Test accuracy is on the 10,000 test images with the run's best.ckpt (chosen on its validation split; "
        "the last weights where the recipe keeps no validation split), no TTA. s/epoch is the run's clock "
        "(training plus validation) over its epochs, so it includes any time the cores were shared.",
        "- A recipe missing here has not been run in its present setup: configs/README.md gives its command, and "
        "the section below keeps the figures measured at commit 19001d2, before the recipes were brought to "
        "their sources.",
        "",
    ]
    for name, rows in results.items():
        recipe = RECIPES[name]
        lines += [
            f"### {name}: `configs/{recipe.config}`",
            "",
            f"Scaled: {recipe.scaled}.",
            "",
            *([recipe.note, ""] if recipe.note else []),
            *(f"{note[0].upper()}{note[1:]}." for note in measured_by(rows)),
            "",
            "| run | model | params | trainable | px | train images | epochs | s/epoch | best val | test |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        waiting = [r["run"] for r in rows if r.get("pending")]
        if waiting:
            lines[-2:-2] = [
                f"{len(rows) - len(waiting)} of {len(rows)} runs finished; not run yet: {', '.join(waiting)} "
                "(the recipe's command runs them).",
                "",
            ]
        for r in rows:
            if r.get("pending"):
                lines.append(f"| {r['run']} | not run yet |" + " |" * 8)
                continue
            lines.append(
                f"| {r['run']} | {r['model']} | {r['params']:,} | {_count(r.get('trainable'))} | {r['image_size']} | "
                f"{r['train_images']:,} | "
                f"{r['epochs']} | {_num(r['s_per_epoch'])} | {_pct(r['best_val_acc'])} | {_pct(r['test_acc'])} |"
            )
        if name in (figures or {}):
            lines += ["", f"![test accuracy, {name}]({figures[name]})"]
        lines.append("")
    return "\n".join(lines)


def _root(name: str, work: Path, smoke: bool) -> Path:
    """Where a recipe's run folders live: a long recipe's in LONG_RUNS (committed), the others' under --work."""
    return LONG_RUNS if RECIPES[name].long_run and not smoke else work / "runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), help="run these recipes (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpeg-style folder")
    parser.add_argument("--work", type=Path, default=WORK / "recipes", help="run folders of the shorter recipes")
    parser.add_argument("--results", type=Path, help="stored rows (default benchmarks/results/recipes.json)")
    parser.add_argument("--smoke", action="store_true", help="2 steps a run on a small copy; no BENCHMARKS.md")
    parser.add_argument(
        "--finished-only",
        action="store_true",
        help="start no run: table the runs that have finished, the others as not run yet (a long sweep's progress)",
    )
    args = parser.parse_args(argv)
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data}/train is not there: give --data a folder with train/<class>/ and test/<class>/")
    data = subset_folder(args.data, args.work / "data", 20, 10) if args.smoke else args.data.resolve()
    names = args.only or list(RECIPES)
    results: dict[str, list[dict[str, Any]]] = {}
    results_file = args.results or results_path("recipes", args.work, local=args.smoke)
    if results_file.is_file():
        results = json.loads(results_file.read_text(encoding="utf-8"))
    call = command().replace(" --finished-only", "") if args.finished_only else None  # the command that trains them
    for name in names:
        print(f"== {name}: {RECIPES[name].scaled}", flush=True)
        points = run_recipe(name, data, _root(name, args.work, args.smoke), args.smoke, args.finished_only)
        rows = [row for p in points for row in (measure(p.path) if p.status == "finished" else [pending(p.name)])]
        results[name] = _stamped(rows, results.get(name, []), call)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results_file, json.dumps(results, indent=1) + "\n")  # a killed call keeps the earlier figures
    ordered = {n: results[n] for n in RECIPES if n in results}
    figures_dir = args.work / "figures" if args.smoke else FIGURES
    figures = {}
    for name in ordered:
        if name in names:
            draw(name, _root(name, args.work, args.smoke), figures_dir / name)
            draw_beside(name, ordered, figures_dir / name)
        drawn = sorted((figures_dir / name).glob("test_acc_vs_*.png"))  # this call's, or an earlier call's
        if drawn:
            figures[name] = drawn[0].relative_to(REPO).as_posix() if drawn[0].is_relative_to(REPO) else str(drawn[0])
    text = markdown(ordered, data, figures)
    publish("recipes", text, args.smoke)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # Ctrl-C or a SIGTERM: the run in progress keeps its last.ckpt
        raise SystemExit("recipes.py: interrupted; the same command resumes where it stopped") from None
