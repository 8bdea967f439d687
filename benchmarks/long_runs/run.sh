#!/usr/bin/env bash
# Every long run, in order, each a resumable sweep: run this again (next session) and finished runs
# are skipped, the interrupted one resumes from its last.ckpt. Kill it at any time (checkpoints are
# written atomically); commit benchmarks/long_runs/ before the session ends (README.md here).
#
#   bash benchmarks/long_runs/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/cifar10-jpeg}
RESNET=(configs/cifar10_resnet32.yaml data.dataset=folder "data.root=$DATA" trainer.precision=bf16-mixed)

# He et al.'s ResNet-32 at its full 182 epochs
classlab sweep "${RESNET[@]}" exp_name=resnet32_full run.root=benchmarks/long_runs --grid model.depth=32
# ResNet-20/44/56 at the scaled schedule (30 epochs, drops at 50% and 75%), beside ResNet-32's scaled row
classlab sweep "${RESNET[@]}" exp_name=resnet_depths_scaled run.root=benchmarks/long_runs epochs=30 \
  'sched.milestones=[15,22.5]' --grid model.depth=20,44,56
