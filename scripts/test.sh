#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs and starts what the tests need on 127.0.0.1 (nats-server via scripts/nats.sh, a
# 3-node NATS cluster via scripts/nats-cluster.sh, the
# Kafka-protocol broker Tansu via scripts/kafka.sh, PostgreSQL via scripts/postgres.sh, the
# independent clients nats-py and confluent-kafka via scripts/interop.sh), runs everything,
# stops them again.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# A clean checkout builds once: incremental state would only take disk (CI ran out of it).
export CARGO_INCREMENTAL=0

# Each step says how much disk is left and what target/ takes, so a full disk is seen coming.
step() {
  printf '\n== %s\n' "$*"
  printf -- '-- disk: %s free, target/ %s\n' "$(df -h --output=avail . | tail -1 | tr -d ' ')" \
    "$(du -sh target 2>/dev/null | cut -f1)"
}

step "brokers"
scripts/nats.sh fresh
scripts/nats-cluster.sh fresh
scripts/kafka.sh fresh
scripts/postgres.sh fresh
scripts/interop.sh install
trap 'scripts/nats.sh stop; scripts/nats-cluster.sh stop; scripts/kafka.sh stop; scripts/postgres.sh stop' EXIT
eval "$(scripts/nats.sh env | sed 's/^/export /')"
eval "$(scripts/nats-cluster.sh env | sed 's/^/export /')"
eval "$(scripts/kafka.sh env | sed 's/^/export /')"
eval "$(scripts/postgres.sh env | sed 's/^/export /')"
eval "$(scripts/interop.sh env | sed 's/^/export /')"
echo "EVENTBUS_NATS_URL=$EVENTBUS_NATS_URL EVENTBUS_KAFKA_BROKERS=$EVENTBUS_KAFKA_BROKERS EVENTBUS_POSTGRES_URL=$EVENTBUS_POSTGRES_URL"

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-features --all-targets --locked -- -D warnings

step "doc tests"
cargo test --locked --all-features --doc -p eventbus-core -p eventbus -p eventbus-nats -p eventbus-kafka -p eventbus-outbox

step "examples"
cargo run --locked -q -p eventbus-examples --example quickstart
cargo run --locked -q -p eventbus-examples --example ordered_consumer
cargo run --locked -q -p eventbus-examples --example broker_swap
EVENTBUS_URL="$EVENTBUS_NATS_URL" cargo run --locked -q -p eventbus-examples --example broker_swap
EVENTBUS_URL="kafka://$EVENTBUS_KAFKA_BROKERS" cargo run --locked -q -p eventbus-examples --example broker_swap
# The same, configured from a file (and the URL from the environment over it).
EVENTBUS_CONFIG=examples/eventbus.toml cargo run --locked -q -p eventbus-examples --example broker_swap
EVENTBUS_CONFIG=examples/eventbus.toml EVENTBUS_URL="$EVENTBUS_NATS_URL" cargo run --locked -q -p eventbus-examples --example broker_swap
cargo run --locked -q -p eventbus-examples --example outbox
EVENTBUS_URL="$EVENTBUS_NATS_URL" cargo run --locked -q -p eventbus-examples --example outbox
cargo run --locked -q -p eventbus-examples --example prometheus

step "fuzz: replay the corpus and regressions, then each target briefly"
scripts/fuzz.sh replay
scripts/fuzz.sh run 60
# The instrumented build is not needed again.
rm -rf target/fuzz

step "main command, smallest level"
cargo run --locked -q -p eventbus-benches --bin eventbus-bench -- --levels low --repeats 1

# Last, so the runner's summary closes the output.
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
