#!/usr/bin/env bash
# The claims grid (benchmarks/README.md, "Claims grid: protocol"): do the four seed papers' claims hold for
# SmolLM2-135M? Every cell is a `zotune train` run, resumable; finished cells are summarized into
# benchmarks/results/claims-smollm2 (runs.jsonl, configs/, lr/). Arguments go to python -m zotune.bench.claims:
#   bash benchmarks/claims.sh plan                              # every cell and its status
#   bash benchmarks/claims.sh run --lanes 2                     # pending cells on this CPU, 2 at a time
#   bash benchmarks/claims.sh run --only 'sst2-*' --phase scan  # a part of the grid
#   bash benchmarks/claims.sh table                             # benchmarks/results/claims-smollm2/claims.md
# The checkout's src is put first on PYTHONPATH, so no install (and no jsonargparse) is needed to run cells.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then source .venv/bin/activate; fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=$(command -v python || command -v python3)
exec "$PY" -m zotune.bench.claims "$@"
