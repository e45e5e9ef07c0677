#!/usr/bin/env bash
# The main job on the embedded default model: a cloud server process and an edge process on loopback,
# one collaborative generation over the WebSocket link, its text streamed and its statistics printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
K=${OFFRAMP_EXIT_LAYER:-15}
PROMPT=${1:-"Explain in two sentences why the sky is blue."}
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp -t offramp-cloud.XXXXXX.log)
.venv/bin/offramp cloud serve --model default --exit-layer "$K" --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
CLOUD=$!
trap 'kill $CLOUD 2>/dev/null; wait $CLOUD 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  if .venv/bin/python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/healthz', timeout=1)" 2>/dev/null; then break; fi
  kill -0 $CLOUD 2>/dev/null || { cat "$LOG"; echo "the cloud server exited" >&2; exit 1; }
  sleep 0.5
done
echo "cloud: ws://127.0.0.1:$PORT (pid $CLOUD, log $LOG); edge: exit layer $K"
# fp32 hidden states: lossless mode then gives the full model's text token for token (the default codec, int8o,
# sends a quarter of the bytes and keeps >= 99.5% of its tokens); OFFRAMP_CODEC=int8o shows the default.
.venv/bin/offramp generate --model default --cloud "ws://127.0.0.1:$PORT" --exit-layer "$K" --chat \
  --codec "${OFFRAMP_CODEC:-fp32}" --max-new-tokens 96 --prompt "$PROMPT" --json | .venv/bin/python scripts/show_generation.py
