#!/usr/bin/env bash
# The simulated scale test of issue 13: VOLUMES sparse volumes over NODES
# nodes (default 200 over 5), all migrating at once, handed off and
# completed, against a real etcd; prints etcd's request rate and the
# directory's latency sampled throughout (release build).
#
# Usage: bench/cluster-scale.sh [VOLUMES] [NODES]
# Results: printed, and bench/out/cluster-scale.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
DLSM_SCALE_VOLUMES=${1:-200} DLSM_SCALE_NODES=${2:-5} cargo test --release --features cluster \
  --test cluster -- scale_volumes_over_nodes_migrating_at_once --nocapture 2>&1 \
  | grep -E '^scale:|panicked|^test result' | tee bench/out/cluster-scale.txt
grep -q '^scale: etcd' bench/out/cluster-scale.txt
