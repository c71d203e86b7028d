#!/usr/bin/env bash
# Convergence of MeZO, LOZO, LOZO-M and MeZO-SVRG on SST-2 with SmolLM2-135M-Instruct: training loss against
# forward passes, same data, seed and forward budget for every method (the recipe of the main job, shortened).
#   bash benchmarks/convergence.sh                 # all runs, then the table and the plot
#   BUDGET=400 OUT=runs/conv bash benchmarks/convergence.sh
# Results: benchmarks/results/convergence-smollm2-sst2/{table.md,runs.jsonl,loss-vs-forwards.png}
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
OUT=${OUT:-runs/convergence}
BUDGET=${BUDGET:-160}
RESULTS=${RESULTS:-benchmarks/results/convergence-smollm2-sst2}
common=(--config recipes/smollm2-sst2-mezo.yaml --data.n_dev 100 --train.steps 100000
        --train.max_forwards "$BUDGET" --train.eval_every 0 --train.early_stopping 0 --train.test false
        --train.test_at_start false --train.checkpoint_every 0 --train.progress false --train.tensorboard false
        --overwrite true)
run() { local name=$1; shift; [ -n "${ONLY:-}" ] && [[ $name != $ONLY* ]] && return; zotune train "${common[@]}" --out "$OUT/$name" "$@"; }

# the grid searched (lr; eps 1e-3 throughout): MeZO's 5e-5 is the main job's scan winner
run mezo-lr5e-5     --method mezo   --mezo.lr 5e-5
run lozo-lr5e-5     --method lozo   --lozo.lr 5e-5   --lozo.rank 2 --lozo.refresh_every 50
run lozo-lr2.5e-5   --method lozo   --lozo.lr 2.5e-5 --lozo.rank 2 --lozo.refresh_every 50
run lozo_m-lr5e-5   --method lozo_m --lozo_m.lr 5e-5 --lozo_m.rank 2 --lozo_m.refresh_every 50 --lozo_m.beta 0.9
run mezo_svrg-lr5e-5 --method mezo_svrg --mezo_svrg.lr 5e-5 --mezo_svrg.anchor_lr 1e-4 --mezo_svrg.q 4 \
    --mezo_svrg.anchor_size 64

python -m zotune.bench.convergence "$OUT"/* --out "$RESULTS"
