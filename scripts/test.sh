#!/usr/bin/env bash
# The test suite: unit tests on tiny models plus the `real` tests (SmolLM2-135M and ../shared/data). Under CI
# (CI=true) a missing model wheel or data folder fails the real tests instead of skipping them.
# Extra arguments go to pytest (e.g. -m "not real"). Installs the tested set (requirements/lock.txt) first;
# ZOTUNE_DEPS=latest installs the newest versions pyproject.toml allows instead (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
