#!/usr/bin/env bash
# Install Go (Debian's golang-go) for the test that renders exported Ollama templates with Go's own
# text/template, as Ollama does (tests/test_chat_templates.py; without Go that test checks the
# Python rendering only).
#
#   scripts/golang.sh     # as root (CI), or with sudo available
set -euo pipefail

if command -v go >/dev/null 2>&1; then
  echo "golang: $(go version) already installed" >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "golang: run as root to install golang-go" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >/dev/null
$sudo apt-get install -y -q --no-install-recommends golang-go >/dev/null
echo "golang: installed $(go version)" >&2
