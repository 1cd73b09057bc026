#!/usr/bin/env bash
# A throwaway S3 server on loopback (moto's standalone server, PyPI `moto[server]`) for the
# object-storage tests, or for trying TUNERY_STORAGE_URL=s3://… on a laptop.
#
#   scripts/s3.sh start   # start it on 127.0.0.1; prints its endpoint URL
#   scripts/s3.sh url     # prints the endpoint URL of the running server
#   scripts/s3.sh stop    # stops it (its buckets live in memory and go with it)
#
#   export TUNERY_TEST_S3_URL="$(scripts/s3.sh start)"
#
# Any access key and secret are accepted (AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing);
# point tunery at it with TUNERY_STORAGE_URL=s3://BUCKET/prefix and
# TUNERY_STORAGE_OPTIONS='{"endpoint_url": "<the URL>"}'.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${TUNERY_S3_DIR:-/tmp/tunery-s3}"
first_port="${TUNERY_S3_PORT:-9329}"
py="${TUNERY_PYTHON:-.venv/bin/python}"

log() { echo "s3.sh: $*" >&2; }

port_free() { ! (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

url() {
  [ -f "$dir/port" ] || { log "not started (no $dir/port)"; exit 1; }
  echo "http://127.0.0.1:$(cat "$dir/port")"
}

start() {
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then url; return 0; fi
  "$py" -c "import moto.server, flask" 2>/dev/null || {
    log "installing moto[server]"
    "$py" -m pip install -q --disable-pip-version-check "moto[server]>=5" >&2
  }
  mkdir -p "$dir"
  local port="$first_port"
  while ! port_free "$port"; do port=$((port + 1)); done
  echo "$port" >"$dir/port"
  setsid "$py" -m moto.server -H 127.0.0.1 -p "$port" >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 1 100); do
    if ! port_free "$port"; then url; return 0; fi
    sleep 0.2
  done
  log "the server did not start; its log:"; cat "$dir/log" >&2; exit 1
}

stop() {
  if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 start|url|stop" >&2; exit 2 ;;
esac
