#!/usr/bin/env bash
# The accuracy table: SensZOQ's sensitive-0.1 % mask against random-0.1 % and magnitude-0.1 % masks (all over
# the NF4 4-bit base), full MeZO (fp32) and zero-shot, on SmolLM2-135M-Instruct at one forward-pass budget per run,
# dev-selected, seed 0 for the data, the masks and the run.
#   bash benchmarks/senszoq_table.sh
#   TASKS="sst2" ONLY=sparse BUDGET=200 bash benchmarks/senszoq_table.sh
# The sparse rows share one lr, chosen on SST-2 dev for the Fisher mask from {1e-3, 1e-4} (recipes/smollm2-sst2-senszoq.yaml);
# full MeZO uses the lr scanned on SST-2. The mezo rows are the same runs as peft_table.sh's (same command and seeds).
# CB is the SuperGLUE task (FewGLUE: 32 train, 32 dev, 56 test), cheaper on this CPU than RTE.
# Results: benchmarks/results/senszoq-smollm2/{table.md,runs.jsonl}
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT=${OUT:-runs/senszoq-table}
BUDGET=${BUDGET:-200}
TASKS=${TASKS:-"sst2 cb"}
RESULTS=${RESULTS:-benchmarks/results/senszoq-smollm2}
SPARSE=(--method mezo --model.peft sparse --model.sparsity 0.001 --model.quantize nf4 --mezo.lr 1e-4 --mezo.eps 1e-3)

source benchmarks/table_lib.sh

for task in $TASKS; do
  run "$task" sparse-fisher 20     "${SPARSE[@]}" --model.mask fisher
  run "$task" sparse-random 20     "${SPARSE[@]}" --model.mask random
  run "$task" sparse-magnitude 20  "${SPARSE[@]}" --model.mask magnitude
  run "$task" mezo 20              --method mezo --mezo.lr 5e-5 --mezo.eps 1e-3
done

summarize
