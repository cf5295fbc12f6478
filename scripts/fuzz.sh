#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20), starting from the
# committed seeds (fuzz/seeds/<target>) plus whatever earlier runs left in
# fuzz/corpus/<target>. Fails if any target finds a crash, a hang or a leak;
# the input that did it lands in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo-fuzz passes nightly-only (-Z) flags to rustc; this machine has only a
# stable toolchain, so RUSTC_BOOTSTRAP=1 lets stable accept them. Built with
# debug assertions (-a), so integer overflow panics instead of wrapping; no
# sanitizer (-s none): dlsm's parsers are safe Rust.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(options requests server client_replies api_bodies vhost_requests)
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
cargo fuzz build -s none -a
printf '%-16s %12s %10s %8s\n' target executions exec/s corpus
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log=$(mktemp)
  if ! cargo fuzz run -s none -a "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t FAILED; reproducer in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  corp=$(find "fuzz/corpus/$t" -type f | wc -l)
  printf '%-16s %12s %10s %8s\n' "$t" "$runs" "$rate" "$corp"
  rm -f "$log"
done
