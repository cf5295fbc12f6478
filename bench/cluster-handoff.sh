#!/usr/bin/env bash
# Handoff time in cluster mode beside peer mode (issue 13): the
# destination's first write, which hands the volume off (fence the source;
# in cluster mode also the directory's compare-and-swap in etcd), timed as
# the client sees it, in alternating rounds, one binary, a real etcd.
#
# Usage: bench/cluster-handoff.sh [ROUNDS]
# Results: printed, and bench/out/cluster-handoff.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
DLSM_HANDOFF_ROUNDS=${1:-20} cargo test --release --features cluster --test cluster \
  -- --ignored handoff_time_in_cluster_mode_beside_peer_mode --nocapture 2>&1 \
  | grep -E '^handoff:|panicked|^test result' | tee bench/out/cluster-handoff.txt
grep -q '^handoff: cluster / peer' bench/out/cluster-handoff.txt
