#!/usr/bin/env bash
# Installs and runs a private PostgreSQL cluster for the outbox tests, on 127.0.0.1 only.
#   scripts/postgres.sh install   PostgreSQL from Debian (apt-get) if no server binaries are present
#   scripts/postgres.sh start     install if needed, initdb under .build (once), start, wait until ready
#   scripts/postgres.sh fresh     stop, wipe the cluster, start
#   scripts/postgres.sh stop      fast shutdown
#   scripts/postgres.sh env       print the variable the tests read
# Port: EVENTBUS_PG_PORT (default 15432). The cluster trusts local connections: test data only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${EVENTBUS_BUILD_DIR:-$ROOT/.build}
PORT=${EVENTBUS_PG_PORT:-15432}
DATA=$BUILD/pg-data
SOCK=$BUILD/pg-sock
LOG=$BUILD/pg.log

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

install() {
  if [ -n "$(pgbin)" ]; then return; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
  [ -n "$(pgbin)" ] || { echo "PostgreSQL server binaries not found after install" >&2; exit 1; }
}

# initdb and the server refuse to run as root: run them as the package's postgres user.
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ready() { as_owner "$(pgbin)/pg_isready" -q -h 127.0.0.1 -p "$PORT" 2>/dev/null; }

start() {
  install
  if ready; then echo "postgres already up on 127.0.0.1:$PORT"; return; fi
  mkdir -p "$BUILD" "$SOCK"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    mkdir -p "$DATA"
    [ "$(id -u)" = 0 ] && chown -R postgres "$DATA" "$SOCK"
    as_owner "$(pgbin)/initdb" -D "$DATA" -U eventbus --auth=trust -E UTF8 >/dev/null
  fi
  [ "$(id -u)" = 0 ] && chown -R postgres "$DATA" "$SOCK" && touch "$LOG" && chown postgres "$LOG"
  as_owner "$(pgbin)/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
    -o "-k $SOCK -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
  for _ in $(seq 1 100); do
    if ready; then echo "postgres $("$(pgbin)/postgres" --version | awk '{print $3}') up on 127.0.0.1:$PORT"; return; fi
    sleep 0.1
  done
  echo "postgres did not become ready; log:" >&2; cat "$LOG" >&2; exit 1
}

stop() {
  if [ -n "$(pgbin)" ] && [ -f "$DATA/postmaster.pid" ]; then
    as_owner "$(pgbin)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  fresh) stop; rm -rf "$DATA"; start ;;
  stop) stop ;;
  env) echo "EVENTBUS_POSTGRES_URL=postgres://eventbus@127.0.0.1:$PORT/postgres" ;;
  *) echo "usage: $0 install|start|fresh|stop|env" >&2; exit 2 ;;
esac
