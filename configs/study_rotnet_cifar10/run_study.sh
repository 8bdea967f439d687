#!/usr/bin/env bash
# The RotNet study on CIFAR-10 (configs/study_rotnet_cifar10/README.md). Resumable: run it again
# after an interruption and it skips finished runs and resumes the others from last.ckpt.
#
#   bash configs/study_rotnet_cifar10/run_study.sh            # the study (19 min on 2 CPU cores, measured)
#   SMOKE=1 bash configs/study_rotnet_cifar10/run_study.sh    # a few steps per run, to check the wiring
#   JOBS=1 ...                                                # runs at once (default 2: one thread each)
# Larger studies (configs/README.md, "Long runs"): LAYERS='[...]' swaps the backbone of every run, PRETEXT_ARGS
# adds overrides to the pretext (its schedule), DOWNSTREAM_ARGS to every run of (b)-(d) (e.g. the precision),
# CKPT_EPOCHS lists the pretext checkpoints (d) transfers from, IPC replaces the labelled-images grid of (b);
# ROOT keeps each study in its own folder.
set -euo pipefail
cd "$(dirname "$0")/../.."            # the repo root: run.root and init_from paths are relative to it
HERE=configs/study_rotnet_cifar10
JOBS=${JOBS:-2}
ROOT=${ROOT:-runs/study_rotnet_cifar10}
EXTRA=()
[[ -n "${LAYERS:-}" ]] && EXTRA+=("model.layers=$LAYERS")
# shellcheck disable=SC2206
[[ -n "${DOWNSTREAM_ARGS:-}" ]] && EXTRA+=($DOWNSTREAM_ARGS)
if [[ "${SMOKE:-0}" == 1 ]]; then
  ROOT=${ROOT%_cifar10}_smoke
  EXTRA=(trainer.max_steps=3)
fi
ROT=$ROOT/rotation

echo "== (a) rotation pretraining -> $ROT"
PRE=(run.root="$ROOT")
[[ -n "${LAYERS:-}" ]] && PRE+=("model.layers=$LAYERS")
# shellcheck disable=SC2206
[[ -n "${PRETEXT_ARGS:-}" ]] && PRE+=($PRETEXT_ARGS)
[[ "${SMOKE:-0}" == 1 ]] && PRE+=(data.images_per_class=20 epochs=4 trainer.keep_every=1)
status=$(python -c "import json,sys; print(json.load(open(sys.argv[1])).get('status',''))" "$ROT/summary.json" 2>/dev/null || true)
if [[ "$status" == finished ]]; then
  echo "finished already"
elif [[ -d "$ROT" ]]; then
  classlab pretrain rotation $HERE/pretrain_rotation.yaml "${PRE[@]}" --resume
else
  classlab pretrain rotation $HERE/pretrain_rotation.yaml "${PRE[@]}"
fi
EPOCHS=${CKPT_EPOCHS:-4,8,12,16,20}
[[ "${SMOKE:-0}" == 1 ]] && EPOCHS=2,4

# Equal optimizer steps: N images a class at batch 50 is N/5 steps an epoch; 8000/N epochs = 1,600 steps.
IPC=${IPC:-"data.images_per_class,epochs,trainer.val_every=[10,800,80],[20,400,40],[50,160,16],[100,80,8],[500,16,2]"}
FULL500=(data.images_per_class=500 epochs=16 trainer.val_every=2)

echo "== (b) scratch vs rotation-initialised fine-tuned vs frozen + conv head, N = 10..500 a class"
classlab sweep $HERE/downstream.yaml run.root="$ROOT" exp_name=images_per_class "${EXTRA[@]}" --jobs "$JOBS" --quiet \
  --grid "$IPC" \
  --grid "model.init_from,model.freeze,model.head=[null,none,linear],[$ROT,none,linear],[$ROT,all,conv_fc]" || true

echo "== (c) frozen rotation features truncated after block 2, 4, 5 or all 7, linear and conv heads (N = 500)"
classlab sweep $HERE/downstream.yaml run.root="$ROOT" exp_name=truncation "${FULL500[@]}" "${EXTRA[@]}" \
  model.init_from="$ROT" model.freeze=all --jobs "$JOBS" --quiet \
  --grid "model.truncate_at=2,4,5,7" --grid "model.head=linear,conv_fc" || true

echo "== (d) which pretraining epoch transfers best (frozen, conv head, N = 500)"
classlab sweep $HERE/downstream.yaml run.root="$ROOT" exp_name=pretrain_epoch "${FULL500[@]}" "${EXTRA[@]}" \
  model.freeze=all model.head=conv_fc --jobs "$JOBS" --quiet \
  --grid "model.init_from=$(echo $EPOCHS | sed "s#\([0-9]*\)#$ROT:epoch\1#g")" || true

echo "== tables and plots"
classlab compare "$ROOT/images_per_class" --by data.images_per_class --by model.init_from --by model.freeze \
  --by model.head --x data.images_per_class --group model.init_from --group model.freeze --out "$ROOT/report/b"
classlab compare "$ROOT/truncation" --by model.truncate_at --by model.head --out "$ROOT/report/c"
classlab compare "$ROOT/pretrain_epoch" --by model.init_from --out "$ROOT/report/d" --no-plots
classlab compare "$ROT" --metric best_val_acc --metric test_acc --out "$ROOT/report/a"
