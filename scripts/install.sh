#!/usr/bin/env bash
# Installs agent-swarm and all it needs on a fresh machine (CPU). Usage: scripts/install.sh [EXTRAS]
# EXTRAS defaults to "test" (everything for the test suite); "bench" adds the benchmark extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extras="${1:-test}"
# A bare torch requirement would pull a multi-GB CUDA build: install the CPU build first.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[${extras}]"
