#!/usr/bin/env bash
# The main job on the embedded default: fine-tune SmolLM2-135M-Instruct with MeZO on real SST-2 examples.
# Extra arguments go to `zotune demo` (see `zotune demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zotune demo "$@"
