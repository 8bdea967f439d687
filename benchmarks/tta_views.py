"""What a cheaper test-time augmentation costs and buys, on the same trained weights.

    python benchmarks/tta_views.py --threads 2        # the runs vs_airbench.py trained
    python benchmarks/tta_views.py --runs R1 R2 ...   # any fast-recipe run folders

Each run's final weights are tested with each set of views, in the run's own precision and memory
layout (as its final test is), so the accuracy differences are paired: same weights, same images.
Timings are taken one after another in one process, so their ratios hold.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, command, machine, publish, section_head, today  # noqa: E402

MODES = ("flip,translate", "flip,diagonal", "flip")


def measure(run_path: Path, modes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    import torch

    from classlab.config import load_config
    from classlab.data.pipeline import load_data
    from classlab.engine.load import load
    from classlab.engine.metrics import top_k_accuracy
    from classlab.engine.predict import autocast
    from classlab.engine.tta import parse_tta, test_with_tta, views_per_image

    cfg = load_config(run_path / "config.yaml")
    model = load(run_path, "last").model.eval()
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    test = load_data(cfg, split=json.loads((run_path / "split.json").read_text())).test
    loader = test.loader(1000, shuffle=False, seed=0, size=cfg.data.image_size)
    out = {}
    for mode in modes:
        started = time.perf_counter()
        with torch.no_grad(), autocast(cfg, torch.device("cpu")):
            _, labels, probs = test_with_tta(model, loader, mode, cfg.data.image_size)
        out[mode] = {
            "accuracy": top_k_accuracy(probs, labels, 1),
            "seconds": time.perf_counter() - started,
            "views": views_per_image(parse_tta(mode, cfg.data.image_size)),
        }
    return out


def markdown(results: dict[str, Any], meta: dict[str, str]) -> str:
    notes = [
        "each run's final weights tested with each set of views, in its training precision; paired differences",
        "runs: " + ", ".join(f"`{Path(r).name}`" for r in results),
    ]
    lines = [
        *section_head("Test-time views of the fast recipe: cost and accuracy on the same weights", meta, notes),
        "| views | per image | accuracy (mean of runs) | vs flip,translate (points) | seconds | time ratio |",
        "|---|---|---|---|---|---|",
    ]
    runs = list(results.values())
    for mode in MODES:
        acc = [r[mode]["accuracy"] for r in runs]
        diff = [r[mode]["accuracy"] - r["flip,translate"]["accuracy"] for r in runs]
        secs = [r[mode]["seconds"] for r in runs]
        ratio = statistics.mean(secs) / statistics.mean(r["flip,translate"]["seconds"] for r in runs)
        lines.append(
            f"| {mode} | {runs[0][mode]['views']} | {statistics.mean(acc):.4f} | "
            f"{100 * statistics.mean(diff):+.2f} | {statistics.mean(secs):.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=None, help="run folders (default: vs_airbench's classlab runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="no BENCHMARKS.md")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [Path(r) for r in args.runs] if args.runs else sorted((WORK / "vs_airbench" / "runs").glob("*_seed*"))
    runs = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    if not runs:
        print("error: no finished run folders; run benchmarks/vs_airbench.py first or pass --runs")
        return 2
    results = {str(r): measure(r, MODES) for r in runs}
    for r, res in results.items():
        print(r, {m: round(v["accuracy"], 4) for m, v in res.items()})
    publish("tta_views", markdown(results, {"date": today(), "machine": machine(), "command": command()}), args.smoke)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
