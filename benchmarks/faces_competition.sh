#!/usr/bin/env bash
# The competition pipeline measured on UTKFace with the recipe as shipped (README "Competition pipeline", configs/faces_multitask.yaml).
# Resumable: run it again and finished folds are kept. Work files under benchmarks/_work/faces (ignored by git).
#   nice -n 5 bash benchmarks/faces_competition.sh > benchmarks/_work/faces.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
W=benchmarks/_work/faces
DATA=${UTKFACE:-../shared/data/utkface}
[ -d "$DATA" ] || DATA=/work/shared/data/utkface
mkdir -p "$W"
export PYTHONPATH=src
# 1. An 80/20 seeded holdout of labels.csv, stratified by the combined label: the test set the ensemble is scored on.
python - "$DATA" "$W" <<'PY'
import csv, random, sys, collections
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader(open(data / "labels.csv")))
by = collections.defaultdict(list)
for r in rows:
    by[(r["age_group"], r["gender"], r["race"])].append(r)
rng, train, test = random.Random(0), [], []
for key in sorted(by):
    g = by[key]; rng.shuffle(g); n = round(len(g) * 0.2); test += g[:n]; train += g[n:]
for name, part in (("train", train), ("test", test)):
    with open(out / f"{name}.csv", "w", newline="") as h:
        w = csv.DictWriter(h, fieldnames=list(rows[0])); w.writeheader(); w.writerows(sorted(part, key=lambda r: r["path"]))
PY
WEIGHTS=${MOBILENET_WEIGHTS:-../shared/weights/mobilenet_v2_imagenet.pth}
[ -f "$WEIGHTS" ] || WEIGHTS=/work/shared/weights/mobilenet_v2_imagenet.pth
# The recipe as shipped; only the data paths, the offline weights file and the work folders are set here.
RUN_ARGS=(data.root="$(realpath "$DATA")" data.csv_file="$(realpath $W/train.csv)" data.test_csv_file="$(realpath $W/test.csv)"
       run.root=$W/runs data.cache_dir=$W/cache model.pretrained_path="$(realpath "$WEIGHTS")"
       trainer.threads=${THREADS:-2} trainer.progress=false)
# 2. Five folds without and with class weights (each fold also scores the holdout test set at its end).
for cw in none balanced; do
  start=$(date +%s)
  python -m classlab.cli train configs/faces_multitask.yaml --folds 5 "${RUN_ARGS[@]}" exp_name=faces_cw_$cw \
      loss.class_weights=$([ $cw = none ] && echo null || echo balanced)
  echo "faces_cw_$cw: 5 folds + oof in $(( $(date +%s) - start )) s"
done
# 3. The 5-fold ensemble of each on the holdout test set.
for cw in none balanced; do
  start=$(date +%s)
  python -m classlab.cli eval $W/runs/faces_cw_$cw --ensemble mean || echo "ensemble eval of faces_cw_$cw failed"
  echo "ensemble faces_cw_$cw: $(( $(date +%s) - start )) s"
done
# 4. The table, and a submission file: a template of the holdout's file names, filled by the 5-fold ensemble.
python benchmarks/faces_table.py $W/runs
python -c "
import csv, sys
rows = list(csv.DictReader(open('$W/test.csv')))
with open('$W/info.csv', 'w') as h:
    h.write('ImageID,ans\n'); h.writelines(r['path'].split('/')[-1] + ',\n' for r in rows)
"
start=$(date +%s)
python -m classlab.cli predict $W/runs/faces_cw_none "$DATA/images" --ensemble mean --template $W/info.csv \
    --id-column ImageID --label-column ans --out $W/submission.csv
echo "submission: $(( $(date +%s) - start )) s"
