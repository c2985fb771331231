#!/usr/bin/env bash
# A new user's install, end to end: build the project's wheel, install it into a fresh venv from
# the registry (no pip cache, CPU torch as deploy/install.sh gets it), then, from an empty
# directory outside the checkout, `python -m glmserve.deploy up --detach`, one chat completion and
# one token-id completion through HTTP, and `down`. Run by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/glmserve-fresh.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip wheel -q --no-deps --no-cache-dir --no-build-isolation -w "$WORK/dist" . 2>/dev/null ||
  python3 -m pip wheel -q --no-deps --no-cache-dir -w "$WORK/dist" .
WHEEL=$(ls "$WORK"/dist/glmserve-*.whl)
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install -q --no-cache-dir --upgrade pip
bash deploy/install_torch.sh "$PY" --no-cache-dir
"$PY" -m pip install -q --no-cache-dir "$WHEEL"
mkdir "$WORK/run" && cd "$WORK/run"
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
BASE=$((10000 + RANDOM % 20000))  # below the ephemeral range
"$PY" -c "import glmserve.deploy.default_model as d, os; assert d.preset_names(), 'model configs missing from the wheel'"
"$PY" -m glmserve.deploy up --detach --port "$PORT" --port_base "$BASE" --health_base $((BASE + 100)) --ready_timeout 300
trap '"$PY" -m glmserve.deploy down >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
"$PY" - "$PORT" <<'PYEOF'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def post(path, body):
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
chat = post("/v1/chat/completions", {"model": "default", "max_tokens": 8,
                                     "messages": [{"role": "user", "content": "Hello"}]})
assert chat["usage"]["completion_tokens"] >= 1, chat
comp = post("/v1/completions", {"model": "default", "prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
assert comp["usage"]["completion_tokens"] == 4, comp
print("fresh install ok:", chat["usage"], comp["usage"])
PYEOF
"$PY" -m glmserve.deploy down
