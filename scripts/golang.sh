#!/usr/bin/env bash
# Install Go (Debian's golang-go) for the test that renders exported Ollama templates with Go's own
# text/template, as Ollama does (tests/test_chat_templates.py; without Go that test checks the
# Python rendering only).
#
#   scripts/golang.sh     # as root (CI), or with sudo available
set -euo pipefail
exec "$(dirname "$0")/debian.sh" go golang-go
