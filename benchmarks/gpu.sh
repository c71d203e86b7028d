#!/usr/bin/env bash
# One prepared GPU session (a CUDA machine with the default model installed or converted, and the data folder in
# $ZOTUNE_DATA): the CUDA tests, the packed-step benchmark, then claims-grid cells until a deadline. Everything it
# writes goes under OUT; bring it back and `python -m zotune.bench.claims unpack OUT/claims.tar.gz` merges the cells.
#   bash benchmarks/gpu.sh OUT [SECONDS] [CELL GLOB ...]
#   bash benchmarks/gpu.sh /tmp/gpu 540 'sst2-mezo-s[0-9]' 'sst2-nspsa4-*'   ('sst2-mezo-*' matches MeZO-SVRG too)
# PARTS (default "tests packed claims"; also "check": rerun committed rows, CHECK="CELL ...", from their configs)
# picks the parts to run, e.g. PARTS=claims for the grid cells alone; the cells start in the order of the globs,
# from the committed results (their lr picks, their finished cells).
# SECONDS (default 480) bounds the whole script: the grid stops starting cells when the time left is short, stops
# running ones at the deadline (they resume from their checkpoints on a later run) and the finished ones are packed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu.sh OUT [SECONDS] [CELL GLOB ...]}
TOTAL=${2:-480}
shift $(( $# >= 2 ? 2 : $# ))
mkdir -p "$OUT"
WORK=$(mktemp -d)  # run folders and summaries: only the packed cells come back
cp -r benchmarks/results/claims-smollm2 "$WORK/results"  # the lr picks the seed cells run at
START=$(date +%s)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
PARTS=${PARTS:-tests packed claims}
has() { [[ " $PARTS " == *" $1 "* ]]; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

# 1. the core's CUDA invariants (determinism, replay, packed LOZO == sequential LOZO in fp32 and bf16)
has tests && timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_gpu.py 2>&1 | tail -15 | tee "$OUT/test_gpu.txt"

# 2. packed step ÷ forward of the same rows, against the sequential MeZO / LOZO steps: real batches and 16×64, 64×256
has packed && timeout 150 "$PY" -m zotune.bench.packed --device cuda --workloads sst2,synthetic,synthetic_64x256 \
  --precisions float32,bfloat16 --batches 4 --reps 5 --out "$OUT/packed-gpu.json" 2>&1 | tail -60 | tee "$OUT/packed-gpu.txt"

# 3. claims-grid cells (SST-2 by default) on 8 lanes until 30 s before the end
ONLY=()
for g in "${@:-sst2-*}"; do ONLY+=(--only "$g"); done
DEADLINE=$(( $(left) - 45 ))
if has claims && (( DEADLINE > 60 )); then
  "$PY" -m zotune.bench.claims run --device cuda --lanes 8 --threads 2 --max-failures 100 --grace 15 \
    --deadline-seconds "$DEADLINE" --out "$WORK/runs" --results "$WORK/results" "${ONLY[@]}" 2>&1 | tee "$OUT/claims-run.txt"
  "$PY" -m zotune.bench.claims pack --out "$WORK/runs" "$OUT/claims.tar.gz" 2>&1 | tail -3
fi
# 4. spot-checks: committed rows rerun from their kept configs for 20 forwards (same device: every loss must agree)
if has check; then
  for c in ${CHECK:-sst2-mezo-s0 sst2-lozo-s0 sst2-mezo-svrg-s0 sst2-nspsa4-s0 sst2-fo-lora-s0 sst2-fo-full-s0}; do
    timeout 120 "$PY" -m zotune.bench.claims check "$c" --forwards 20 --device cuda --record \
      --results "$WORK/results" 2>&1 | tail -14
  done | tee "$OUT/checks.txt"
  cp "$WORK/results/checks.jsonl" "$OUT/" 2>/dev/null
fi
echo "gpu.sh: $(( $(date +%s) - START )) s"
