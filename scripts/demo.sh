#!/usr/bin/env bash
# The main job: fine-tune SmolLM2-135M-Instruct with MeZO on real SST-2 (recipes/smollm2-sst2-mezo.yaml), printing
# zero-shot accuracy, the training progress and the fine-tuned accuracy, into the run directory
# runs/smollm2-sst2-mezo (config, metrics, update log, checkpoints, results.json, plot.png).
# Extra arguments are config overrides, e.g. --train.steps 400 --overwrite true (see `zotune train --help`).
# Installs the tested set (requirements/lock.txt) first; ZOTUNE_DEPS=latest: the newest releases (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zotune train --config recipes/smollm2-sst2-mezo.yaml "$@"
