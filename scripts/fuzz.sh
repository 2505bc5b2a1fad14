#!/usr/bin/env bash
# libFuzzer targets of fuzz/ (envelope, headers, codec) on the stable toolchain: the crate is
# built with the sanitizer-coverage flags cargo-fuzz would pass (no cargo-fuzz, no nightly).
#   scripts/fuzz.sh build              build the targets (target/fuzz)
#   scripts/fuzz.sh replay             run every target over its committed corpus and
#                                      regressions (fuzz/corpus/T, fuzz/regressions/T) once
#   scripts/fuzz.sh run SECONDS [T..]  fuzz each target (all by default) for SECONDS, starting
#                                      from the committed corpus; new inputs go to
#                                      .build/fuzz-corpus/T, crashes to .build/fuzz-crashes/T;
#                                      prints the executions of each run
#   scripts/fuzz.sh merge [T..]        minimise .build/fuzz-corpus/T into fuzz/corpus/T
# A crash exits non-zero; its input is kept and becomes a file under fuzz/regressions/T.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN=$ROOT/target/fuzz/$TRIPLE/release
TARGETS=(envelope headers codec)
MAX_LEN=4096

build() {
  (cd "$ROOT/fuzz" && RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebug-assertions -Coverflow-checks" \
    cargo build --locked --release --target "$TRIPLE" --target-dir "$ROOT/target/fuzz")
}

replay() {
  build
  for t in "${TARGETS[@]}"; do
    mkdir -p "$ROOT/fuzz/corpus/$t" "$ROOT/fuzz/regressions/$t"
    n=$(find "$ROOT/fuzz/corpus/$t" "$ROOT/fuzz/regressions/$t" -type f | wc -l)
    echo "replay $t: $n inputs"
    # -runs=0 with directories: every file once, then exit.
    "$BIN/$t" -runs=0 -max_len=$MAX_LEN "$ROOT/fuzz/corpus/$t" "$ROOT/fuzz/regressions/$t" 2>&1 | tail -1
  done
}

run() {
  local secs=$1; shift
  local list=("$@"); [ ${#list[@]} -gt 0 ] || list=("${TARGETS[@]}")
  build
  for t in "${list[@]}"; do
    local work=$ROOT/.build/fuzz-corpus/$t crashes=$ROOT/.build/fuzz-crashes/$t
    mkdir -p "$work" "$crashes" "$ROOT/fuzz/corpus/$t"
    local log=$ROOT/.build/fuzz-$t.log
    set +e
    "$BIN/$t" -max_total_time="$secs" -max_len=$MAX_LEN -print_final_stats=1 \
      -artifact_prefix="$crashes/" "$work" "$ROOT/fuzz/corpus/$t" >"$log" 2>&1
    local rc=$?
    set -e
    local execs; execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz $t: ${secs}s, ${execs:-?} executions, exit $rc ($(grep -E '^#[0-9]+' "$log" | tail -1))"
    if [ $rc -ne 0 ]; then tail -40 "$log" >&2; exit $rc; fi
  done
}

merge() {
  local list=("$@"); [ ${#list[@]} -gt 0 ] || list=("${TARGETS[@]}")
  build
  for t in "${list[@]}"; do
    local tmp; tmp=$(mktemp -d)
    "$BIN/$t" -merge=1 -max_len=$MAX_LEN "$tmp" "$ROOT/fuzz/corpus/$t" "$ROOT/.build/fuzz-corpus/$t" 2>&1 | tail -1
    rm -rf "$ROOT/fuzz/corpus/$t" && mv "$tmp" "$ROOT/fuzz/corpus/$t"
    echo "corpus $t: $(ls "$ROOT/fuzz/corpus/$t" | wc -l) files"
  done
}

case "${1:-}" in
  build) build ;;
  replay) replay ;;
  run) shift; [ $# -ge 1 ] || { echo "usage: $0 run SECONDS [TARGET..]" >&2; exit 2; }; run "$@" ;;
  merge) shift; merge "$@" ;;
  *) echo "usage: $0 build|replay|run SECONDS [TARGET..]|merge [TARGET..]" >&2; exit 2 ;;
esac
