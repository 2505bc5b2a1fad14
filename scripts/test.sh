#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Needs only the Rust toolchain today; broker backends add their brokers here
# (installed and started by scripts/ on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "doc tests"
cargo test --locked --doc -p eventbus-core -p eventbus

step "examples"
cargo run --locked -q -p eventbus-examples --example quickstart
cargo run --locked -q -p eventbus-examples --example ordered_consumer

step "main command, smallest level"
cargo run --locked -q -p eventbus-benches --bin eventbus-bench -- --level low

# Last, so the runner's summary closes the output.
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
