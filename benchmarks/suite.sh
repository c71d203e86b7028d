#!/usr/bin/env bash
# The benchmark: every method on real data, one forward-pass budget per run, dev-selected, seed 0 for the data
# and the run, through `zotune train` (the same command a user runs). One run per (task, row); rows already summarized
# stay (the summary merges), so the suite can be run a piece at a time:
#   bash benchmarks/suite.sh                                   # SmolLM2-135M on this CPU: every task and row
#   TASKS="sst2" ONLY=lozo bash benchmarks/suite.sh            # rows whose name starts with "lozo"
#   SKIP="sst2-mezo sst2-fo-lora" bash benchmarks/suite.sh     # skip runs whose rows are already in runs.jsonl
#   MODEL=path/to/hf-model DEVICE=cuda BUDGET=2000 RESULTS=benchmarks/results/suite-mymodel bash benchmarks/suite.sh
# Rows (one config each, no grid; the MeZO-family lrs are the ones scanned on SST-2 dev here, see recipes/README.md;
# MeZO-prefix's 1e-1 comes from benchmarks/prefix_scan.sh, the paper's 1e-2 leaving the prefix in place at this budget):
#   mezo, mezo-lora, mezo-prefix, lozo, lozo-m, mezo-svrg, sparse-fisher (SensZOQ, 0.1 % over NF4), zofo (Bilevel
#   ZOFO), fo-lora and fo-full (AdamW; one backward per forward, counted apart). Zero-shot is every run's step 0;
#   icl4 (4 in-context demonstrations) and calibrated (content-free calibration) are `zotune eval` on the same test split.
# Tasks: sst2, rte (MeZO protocol: 500 train / 200 dev from train, test = validation), cb and boolq (FewGLUE: 32 train,
# 32 dev), sst5 and trec (k-shot, LM-BFF: 16 per class for train and for dev).
# Results: $RESULTS/{table.md,runs.jsonl,baselines/}; rows keep their dev and loss curves against forwards. The page:
#   python -m zotune.bench.report $RESULTS --baselines $RESULTS/baselines/*.json --out docs/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT=${OUT:-runs/suite}
BUDGET=${BUDGET:-200}
TASKS=${TASKS:-"sst2 rte cb boolq sst5 trec"}
MODEL=${MODEL:-smollm2-135m}
DEVICE=${DEVICE:-auto}
RESULTS=${RESULTS:-benchmarks/results/suite-smollm2}

source benchmarks/table_lib.sh
EXTRA=(--model.name "$MODEL" --model.device "$DEVICE")   # table_lib's run() appends "$@" after its own flags

baseline() {  # baseline TASK NAME [zotune eval flags]: the untrained model on the runs' own test split
  local task=$1 name=$2; shift 2
  [ -n "${CONFIG_ONLY:-}" ] && return
  [ -n "${ONLY:-}" ] && [[ $name != $ONLY* ]] && return
  [[ " ${SKIP:-} " == *" $task-$name "* ]] && return
  mkdir -p "$RESULTS/baselines"
  zotune eval "$MODEL" --device "$DEVICE" $(data_args "$task") "$@" --out "$RESULTS/baselines/$task-$name.json"
}

for task in $TASKS; do
  baseline "$task" icl4         --icl 4          # in-context learning: 4 demonstrations from the train split
  baseline "$task" calibrated   --calibrated     # zero-shot with content-free calibration
  run "$task" mezo 20          "${EXTRA[@]}" --method mezo --mezo.lr 5e-5 --mezo.eps 1e-3
  run "$task" mezo-lora 20     "${EXTRA[@]}" --method mezo --model.peft lora --mezo.lr 3e-3 --mezo.eps 1e-2
  run "$task" mezo-prefix 20   "${EXTRA[@]}" --method mezo --model.peft prefix --mezo.lr 1e-1 --mezo.eps 1e-1
  run "$task" lozo 20          "${EXTRA[@]}" --method lozo --lozo.lr 5e-5 --lozo.eps 1e-3 --lozo.rank 2 \
      --lozo.refresh_every 50
  run "$task" lozo-m 20        "${EXTRA[@]}" --method lozo_m --lozo_m.lr 5e-5 --lozo_m.eps 1e-3 --lozo_m.rank 2 \
      --lozo_m.refresh_every 50 --lozo_m.beta 0.9
  run "$task" mezo-svrg 20     "${EXTRA[@]}" --method mezo_svrg --mezo_svrg.lr 5e-5 --mezo_svrg.anchor_lr 1e-4 \
      --mezo_svrg.eps 1e-3 --mezo_svrg.q 4 --mezo_svrg.anchor_size 64
  run "$task" sparse-fisher 20 "${EXTRA[@]}" --method mezo --model.peft sparse --model.sparsity 0.001 \
      --model.quantize nf4 --model.mask fisher --mezo.lr 1e-4 --mezo.eps 1e-3
  run "$task" zofo 4           "${EXTRA[@]}" --method zofo --model.peft lora --zofo.lr 5e-5 --zofo.eps 1e-3 \
      --zofo.lr_lower 1e-3 --zofo.lr_upper 1e-3 --zofo.lam 1.0 --zofo.inner_steps 3
  run "$task" fo-lora 40       "${EXTRA[@]}" --method adamw --model.peft lora --adamw.lr 5e-4
  run "$task" fo-full 40       "${EXTRA[@]}" --method adamw --adamw.lr 1e-5
done

summarize
