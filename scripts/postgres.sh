#!/usr/bin/env bash
# A throwaway PostgreSQL for the store and worker tests.
#
#   scripts/postgres.sh start   # install if needed, initdb, start on 127.0.0.1; prints the URL
#   scripts/postgres.sh url     # prints the URL of the running cluster
#   scripts/postgres.sh stop    # stops it and deletes its files
#
#   export TUNERY_TEST_PG_URL="$(scripts/postgres.sh start)"
#
# The cluster lives in $TUNERY_PG_DIR (default /tmp/tunery-pg), trusts connections from
# 127.0.0.1 only, and is tuned for tests (no fsync): never put data you want to keep in it.
# PostgreSQL refuses to run as root, so as root it runs as the `postgres` system user.
set -euo pipefail

dir="${TUNERY_PG_DIR:-/tmp/tunery-pg}"
first_port="${TUNERY_PG_PORT:-54329}"
db="tunery_test"

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  command -v initdb >/dev/null 2>&1 && { dirname "$(command -v initdb)"; return 0; }
  return 1
}

ensure_installed() {
  if find_bin >/dev/null; then return 0; fi
  if [ "$(id -u)" != 0 ]; then
    log "PostgreSQL is not installed; install it (apt-get install postgresql) or run this as root"
    exit 1
  fi
  log "installing PostgreSQL with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
}

# Run a command as the user the cluster belongs to.
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    if ! id postgres >/dev/null 2>&1; then
      useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

url() {
  [ -f "$dir/port" ] || { log "not started (no $dir/port)"; exit 1; }
  echo "postgresql+psycopg://postgres@127.0.0.1:$(cat "$dir/port")/$db"
}

running() {
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1
}

start() {
  ensure_installed
  bin="$(find_bin)"
  if running; then url; return 0; fi
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
      || as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  local port="$first_port"
  while ! port_free "$port"; do port=$((port + 1)); done
  echo "$port" >"$dir/port"
  # fsync and friends off: these databases are thrown away, and tests run several times faster.
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o \
    "-p $port -c listen_addresses=127.0.0.1 -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
  if ! as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
  fi
  url
}

stop() {
  bin="$(find_bin)" || exit 0
  if running; then as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null; fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 start|stop|url" >&2; exit 2 ;;
esac
