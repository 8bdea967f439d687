"""The table of benchmarks/faces_competition.sh: per-task accuracy and macro-F1, without and with class weights.

For each variant: the 5-fold cross-validation (out-of-fold, mean ± std over folds), the single fold
models on the holdout test set (mean ± std), and their mean-probability ensemble on the same test set.
    python benchmarks/faces_table.py [benchmarks/_work/faces/runs]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TASKS = ("age_group", "gender", "race")


def _pm(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def rows(runs: Path, variant: str) -> list[str]:
    top = runs / variant
    summary = json.loads((top / "summary.json").read_text())
    folds = [json.loads((top / f"fold{i}" / "summary.json").read_text()) for i in range(summary["folds"])]
    ens = json.loads((top / "ensemble" / "eval" / "test" / "metrics.json").read_text())
    cv = [_pm(summary[f"fold_{t}/{m}"]) for t in TASKS for m in ("acc", "f1")] + [_pm(summary["fold_acc"])]
    single = [_pm([f[f"test/{t}/{m}"] for f in folds]) for t in TASKS for m in ("acc", "f1")]
    single.append(_pm([f["test_acc"] for f in folds]))
    ensemble = [f"{100 * ens[k][t]:.1f}" for t in TASKS for k in ("tasks", "tasks_f1")] + [f"{100 * ens['top1']:.1f}"]
    wall = f"{summary['wall_time_s'] / 60:.1f} min"
    return [
        f"| {variant} | 5-fold CV (out-of-fold) | " + " | ".join(cv) + f" | {wall} |",
        f"| {variant} | one fold model, test | " + " | ".join(single) + " | |",
        f"| {variant} | 5-fold ensemble, test | " + " | ".join(ensemble) + " | |",
    ]


def main() -> None:
    runs = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/_work/faces/runs")
    head = " | ".join(f"{t} {m}" for t in TASKS for m in ("acc", "F1"))
    print(f"| class weights | scored | {head} | combined acc (30) | training time |")
    print("|---|---|" + "---:|" * 8)
    for variant in ("faces_cw_none", "faces_cw_balanced"):
        if (runs / variant / "ensemble" / "eval" / "test" / "metrics.json").is_file():
            print("\n".join(rows(runs, variant)))


if __name__ == "__main__":
    main()
