#!/usr/bin/env bash
# The accuracy table: zero-shot, MeZO (full), MeZO-LoRA, MeZO-prefix, FO-LoRA (AdamW) and Bilevel ZOFO on
# SmolLM2-135M-Instruct, at one forward-pass budget per run, dev-selected (the best-on-dev weights go to test).
#   bash benchmarks/peft_table.sh                       # every task and method, then the table
#   TASKS="sst2" ONLY=zofo BUDGET=200 bash benchmarks/peft_table.sh
#   SKIP="sst2-mezo-lora sst2-mezo-prefix" bash benchmarks/peft_table.sh   # rows already in runs.jsonl stay
# One config per method, no grid: the MeZO lrs are the ones scanned on SST-2 here (recipes/README.md), the others
# the recipes' untuned starting values. A forward pass is one batch of 16 through the model; first-order steps also
# run a backward each (counted apart, in the `backwards` column). Seed 0 for the data and the run.
# Results: benchmarks/results/peft-smollm2/{table.md,runs.jsonl}
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT=${OUT:-runs/peft-table}
BUDGET=${BUDGET:-200}
TASKS=${TASKS:-"sst2 rte cb"}
RESULTS=${RESULTS:-benchmarks/results/peft-smollm2}

source benchmarks/table_lib.sh

for task in $TASKS; do
  run "$task" mezo 20          --method mezo --mezo.lr 5e-5 --mezo.eps 1e-3
  run "$task" mezo-lora 20     --method mezo --model.peft lora --mezo.lr 3e-3 --mezo.eps 1e-2
  run "$task" mezo-prefix 20   --method mezo --model.peft prefix --mezo.lr 1e-2 --mezo.eps 1e-1
  run "$task" fo-lora 40       --method adamw --model.peft lora --adamw.lr 5e-4
  run "$task" zofo 4           --method zofo --model.peft lora --zofo.lr 5e-5 --zofo.eps 1e-3 \
      --zofo.lr_lower 1e-3 --zofo.lr_upper 1e-3 --zofo.lam 1.0 --zofo.inner_steps 3
done

summarize
