#!/usr/bin/env bash
# Every long run, in order, each a resumable sweep: run this again (next session) and finished runs
# are skipped, the interrupted one resumes from its last.ckpt. Kill it at any time (checkpoints are
# written atomically); commit benchmarks/long_runs/ before the session ends (README.md here).
#
#   bash benchmarks/long_runs/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
RESNET=(configs/cifar10_resnet32.yaml data.dataset=folder "data.root=$DATA" trainer.precision=bf16-mixed trainer.progress=false)

# He et al.'s ResNet-32 at its full 182 epochs
classlab sweep "${RESNET[@]}" exp_name=resnet32_full run.root=benchmarks/long_runs --grid model.depth=32
# ResNet-20/44/56 at the scaled schedule (30 epochs, drops at 50% and 75%), beside ResNet-32's scaled row
classlab sweep "${RESNET[@]}" exp_name=resnet_depths_scaled run.root=benchmarks/long_runs epochs=30 \
  'sched.milestones=[15,22.5]' --grid model.depth=20,44,56
# The RotNet study at a NIN-sized backbone and the paper's pretext schedule (100 epochs, lr /5 after 30, 60, 80),
# bf16 autocast: about 8 min a pretext epoch on the AVX512-BF16 cores alone. Then the downstream sweeps (b)-(d), whose
# labelled runs train longer as N grows (1,600 / 4,000 / 12,000 / 29,400 steps at batch 50), so that scratch and
# RotNet are each near convergence, as in the paper's table: the small study's equal 1,600 steps would leave
# N = 4,900 at 2 epochs, and scratch far from its figure.
ROOT=benchmarks/long_runs/rotnet_nin LAYERS='[96,96,p,192,192,p,192,192,192,p]' CKPT_EPOCHS=20,40,60,80,100 \
  PRETEXT_ARGS='epochs=100 trainer.keep_every=20 sched.name=multistep sched.milestones=[30,60,80] sched.gamma=0.2 trainer.precision=bf16-mixed' \
  DOWNSTREAM_ARGS='trainer.precision=bf16-mixed' \
  IPC='data.images_per_class,epochs,trainer.val_every=[20,400,40],[100,200,20],[1000,60,6],[4900,30,3]' \
  bash configs/study_rotnet_cifar10/run_study.sh
