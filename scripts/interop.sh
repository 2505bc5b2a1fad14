#!/usr/bin/env bash
# The independent clients of the interop tests (crates/eventbus/tests/interop.rs), pinned, in
# their own venv under .build/:
#   scripts/interop.sh install   nats-py and confluent-kafka from PyPI
#   scripts/interop.sh env       print EVENTBUS_PYTHON for the tests
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${EVENTBUS_BUILD_DIR:-$ROOT/.build}
VENV=$BUILD/interop-venv

install() {
  if "$VENV/bin/python" -c 'import nats, confluent_kafka' >/dev/null 2>&1; then return; fi
  mkdir -p "$BUILD"
  [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check nats-py==2.16.0 confluent-kafka==2.16.1
}

case "${1:-}" in
  install) install ;;
  env) echo "EVENTBUS_PYTHON=$VENV/bin/python" ;;
  *) echo "usage: $0 install|env" >&2; exit 2 ;;
esac
