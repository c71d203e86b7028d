#!/usr/bin/env bash
# MeZO-prefix learning-rate scan on SST-2, selected on dev only (test is reported, never used to choose).
# MeZO's paper lr for prefix tuning (1e-2, eps 1e-1) leaves a 5-token prefix where it started within a 200-forward
# budget on SmolLM2-135M (peft table: dev 0.585 -> 0.585): its projected gradients have a median |g| of about 0.16,
# so a step moves each prefix coordinate by about lr * 0.16. The scan tries larger lrs at the same eps.
#   bash benchmarks/prefix_scan.sh                 # lrs 1e-1 and 1 (1e-2 is the peft table's sst2-mezo-prefix row)
#   LRS="3e-1" bash benchmarks/prefix_scan.sh      # more points; rows merge into the same runs.jsonl
# Results: benchmarks/results/prefix-scan-smollm2/{table.md,runs.jsonl}
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT=${OUT:-runs/prefix-scan}
BUDGET=${BUDGET:-200}
LRS=${LRS:-"1e-1 1"}
RESULTS=${RESULTS:-benchmarks/results/prefix-scan-smollm2}

source benchmarks/table_lib.sh

for lr in $LRS; do
  run sst2 "mezo-prefix-lr$lr" 20 --method mezo --model.peft prefix --mezo.lr "$lr" --mezo.eps 1e-1
done

summarize
