#!/usr/bin/env bash
# Installs what the dashboard's browser tests drive: Debian's Chromium (/usr/bin/chromium, via
# apt-get, only when missing) and the `playwright` PyPI package (its Python API only: we never run
# `playwright install`, the tests launch the system Chromium). Usage: scripts/install_browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "install_browser.sh: /usr/bin/chromium is missing and installing it needs root (apt-get install chromium)" >&2
      exit 1
    fi
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet playwright
fi
# Pillow decodes the screenshots the tests check for blankness (also in the "test" extras).
if ! "$PY" -c "import PIL" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet Pillow
fi
/usr/bin/chromium --version 2>/dev/null
