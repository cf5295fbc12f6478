#!/usr/bin/env bash
# Reruns every fault-injection test and prints the one-line figures each
# reports (FAULTS ...): faults injected, writes and bytes checked against a
# model, bytes lost. RELIABILITY.md quotes the last run. Needs root (network
# namespaces, tmpfs) and the tools scripts/test.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
run() { cargo test --release --quiet --test "$1" -- --nocapture --test-threads=1 "${@:2}" 2>/dev/null | grep -o 'FAULTS.*' ; }
run model
run migration destination_killed source_loss source_lost forced_handoff
run faults
