#!/usr/bin/env bash
# The serial start of PARL run 4 (docs/PARL.md): the built-in policy after 100 more SFT steps on its
# own recipe in which 3 of 4 tasks' plans run every fan-out's copies one at a time ("parallel": 1).
# Greedy, it then writes serial plans (held-out v1: item-F1 0.936, 19.1 critical steps, against the
# built-in policy's 0.940 and 5.5); sampled, it still writes the parallel form a quarter of the time,
# which is what PARL's group-relative reward compares. About 9 minutes on 2 CPU cores.
#
#   scripts/train_serial_start.sh [OUT]        # OUT defaults to checkpoints/serial-start
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-checkpoints/serial-start}"
"${PYTHON:-python}" -m planner.sft --preset small --out "$OUT" --steps 100 --seed 24 --batch-tokens 12288 \
  --lr 3e-05 --min-lr-ratio 0.1 --warmup 10 --weight-decay 0.1 --grad-clip 1.0 --train-tasks 600 --eval-tasks 30 \
  --data-seed 24 --kinds subagent orchestrator_plan aggregate --repeat orchestrator_plan=10 --eval-every 100 \
  --save-every 20 --tokenizer byte:512 --context-loss-weight 0.1 --fake-entity-copies 2 --fake-names places+countries \
  --twin-names 0.3 --fake-only --spaced-names --fake-languages --serial-plans 0.75 --init-from planner/builtin_policy \
  --save-dtype bfloat16 --device cpu
