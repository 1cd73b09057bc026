#!/usr/bin/env bash
# Install what the dashboard's browser tests (tests/test_dashboard_browser.py) need on a fresh
# Debian machine: Debian's headless Chromium. The tests drive it with Playwright's Python
# package (in the `dev` extras), pointed at /usr/bin/chromium: never `playwright install`,
# which downloads browser builds of its own.
#
#   scripts/browser.sh     # as root (CI), or with sudo available
set -euo pipefail
# fonts-dejavu-core: readable text in screenshots on a minimal image.
exec "$(dirname "$0")/debian.sh" chromium chromium chromium-driver fonts-dejavu-core
