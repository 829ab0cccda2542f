#!/usr/bin/env bash
# Installs everything the tests need (incl. Debian Chromium for the browser tests), then runs the whole
# suite (CPU; about 10 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
# Debian Chromium + Playwright for the dashboard's browser tests (no browser download).
bash scripts/install_browser.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
