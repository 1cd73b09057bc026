#!/usr/bin/env bash
# Install what the dashboard's browser tests (tests/test_dashboard_browser.py) need on a fresh
# Debian machine: Debian's headless Chromium. The tests drive it with Playwright's Python
# package (in the `dev` extras), pointed at /usr/bin/chromium: never `playwright install`,
# which downloads browser builds of its own.
#
#   scripts/browser.sh     # as root (CI), or with sudo available
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "browser: run as root to install chromium" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
# fonts-dejavu-core: readable text in screenshots on a minimal image.
$sudo apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
echo "browser: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)" >&2
