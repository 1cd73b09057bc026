#!/usr/bin/env bash
# Install Debian packages for a command that is missing; nothing when it is already there.
#
#   scripts/debian.sh COMMAND PACKAGE...     # as root (CI), or with sudo available
#
# Used by browser.sh (Chromium), golang.sh (Go) and setup.sh (bubblewrap, the python grader's sandbox).
set -euo pipefail
cmd="$1"; shift
if command -v "$cmd" >/dev/null 2>&1; then
  echo "debian: $cmd already installed" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "debian: run as root to install $*" >&2; exit 1; }
  sudo="sudo"
fi
command -v apt-get >/dev/null 2>&1 || { echo "debian: no apt-get here; install $* with your package manager" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null
echo "debian: installed $*" >&2
