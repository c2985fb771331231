#!/usr/bin/env bash
# install_torch.sh PYTHON [PIP_FLAGS...]: a CPU build of torch into PYTHON's environment, before anything
# else can pull a multi-GB CUDA build: the CPU wheel this machine keeps on disk (pip's find-links) when
# there is one, else PyTorch's CPU index.
set -euo pipefail
PY=$1; shift
"$PY" -c "import torch" 2>/dev/null && exit 0
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if "$PY" -m pip download -q --no-deps --no-index -d "$tmp" torch==2.13.0 2>/dev/null; then
  "$PY" -m pip install -q "$@" torch==2.13.0   # torch from the local wheel (2.13.0+cpu), its deps from PyPI
else
  "$PY" -m pip install -q "$@" torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
fi
