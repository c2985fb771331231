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
bash deploy/install_torch.sh "$PY" $PIP_FLAGS
"$PY" -m pip install -q $PIP_FLAGS -e ".[$EXTRAS]"
