#!/usr/bin/env bash
# A 3-node NATS cluster with JetStream on 127.0.0.1 (routes between the nodes; streams with
# 3 replicas work on it), for the cluster tests. Uses the nats-server scripts/nats.sh installs.
#   scripts/nats-cluster.sh start        start the nodes that are not running, wait until all are healthy
#   scripts/nats-cluster.sh fresh        stop, wipe the stores, start
#   scripts/nats-cluster.sh start-node N start node N (1-3) on its store, wait until it is healthy
#   scripts/nats-cluster.sh stop         SIGTERM every node and wait
#   scripts/nats-cluster.sh env          print the variables the tests read
# Node N (server_name nN): client port 14230+N, cluster port 16230+N, monitor port 18230+N;
# its pid in .build/nats-cluster/nN.pid (a test kills a node with SIGKILL through it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${EVENTBUS_BUILD_DIR:-$ROOT/.build}
DIR=$BUILD/nats-cluster
BIN=$BUILD/venv/bin/nats-server

healthy() { curl -fsS "http://127.0.0.1:$((18230 + $1))/healthz" >/dev/null 2>&1; }
running() { [ -f "$DIR/n$1.pid" ] && kill -0 "$(cat "$DIR/n$1.pid")" 2>/dev/null; }

conf() {
  local n=$1
  mkdir -p "$DIR/n$n"
  cat > "$DIR/n$n.conf" <<CONF
server_name: n$n
listen: 127.0.0.1:$((14230 + n))
http: 127.0.0.1:$((18230 + n))
jetstream {
  store_dir: "$DIR/n$n"
  max_file_store: 1099511627776
  max_memory_store: 4294967296
}
cluster {
  name: eventbus
  listen: 127.0.0.1:$((16230 + n))
  routes: [
    nats-route://127.0.0.1:16231
    nats-route://127.0.0.1:16232
    nats-route://127.0.0.1:16233
  ]
}
CONF
}

spawn() {
  local n=$1
  if running "$n"; then return; fi
  conf "$n"
  nohup "$BIN" -c "$DIR/n$n.conf" >>"$DIR/n$n.log" 2>&1 &
  echo $! > "$DIR/n$n.pid"
}

wait_healthy() {
  for _ in $(seq 1 300); do
    local ok=1
    for n in "$@"; do healthy "$n" || ok=0; done
    if [ $ok = 1 ]; then return; fi
    sleep 0.1
  done
  echo "nats cluster nodes $* did not become healthy; logs:" >&2
  for n in "$@"; do tail -20 "$DIR/n$n.log" >&2; done
  exit 1
}

start() {
  "$ROOT/scripts/nats.sh" install
  mkdir -p "$DIR"
  for n in 1 2 3; do spawn "$n"; done
  wait_healthy 1 2 3
  # Healthy nodes may still be electing the JetStream meta leader: wait for it too.
  for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:18231/jsz" 2>/dev/null | grep -q '"leader"'; then break; fi
    sleep 0.1
  done
  echo "nats cluster up: nats://127.0.0.1:14231,nats://127.0.0.1:14232,nats://127.0.0.1:14233"
}

start_node() {
  mkdir -p "$DIR"
  spawn "$1"
  wait_healthy "$1"
}

stop() {
  for n in 1 2 3; do
    if [ -f "$DIR/n$n.pid" ]; then
      pid=$(cat "$DIR/n$n.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/n$n.pid"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  fresh) stop; rm -rf "$DIR"; start ;;
  start-node) [ "${2:-}" -ge 1 ] 2>/dev/null && [ "$2" -le 3 ] || { echo "start-node 1|2|3" >&2; exit 2; }; start_node "$2" ;;
  stop) stop ;;
  env)
    echo "EVENTBUS_NATS_CLUSTER_URLS=nats://127.0.0.1:14231,nats://127.0.0.1:14232,nats://127.0.0.1:14233"
    echo "EVENTBUS_NATS_CLUSTER_SCRIPT=$ROOT/scripts/nats-cluster.sh"
    echo "EVENTBUS_NATS_CLUSTER_DIR=$DIR"
    ;;
  *) echo "usage: $0 start|fresh|start-node N|stop|env" >&2; exit 2 ;;
esac
