#!/usr/bin/env bash
# Installs the project (editable) into ./.venv with a CPU build of torch, installed first so that
# nothing pulls a multi-GB CUDA build. Env: VENV (default .venv), EXTRAS (default test),
# PIP_FLAGS (e.g. --no-cache-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
PIP_FLAGS=${PIP_FLAGS:-}
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q $PIP_FLAGS --upgrade pip
if ! "$PY" -c "import torch" 2>/dev/null; then
  # A CPU wheel this machine keeps on disk (pip's find-links) if there is one, else PyTorch's CPU index.
  "$PY" -m pip install -q $PIP_FLAGS --no-index torch==2.13.0 2>/dev/null ||
    "$PY" -m pip install -q $PIP_FLAGS torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install -q $PIP_FLAGS -e ".[$EXTRAS]"
