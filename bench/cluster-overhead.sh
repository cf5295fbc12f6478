#!/usr/bin/env bash
# Cluster mode's cost on the data path (issue 13): fio's nbd engine against
# two nodes built from the same binary (`--features cluster`), one in peer
# mode and one joined to a real etcd (every write of a cluster volume checks
# the lease deadline at admission and after it finished), in alternating
# rounds whose order rotates, on the same kind of volume.
#
# Usage: bench/cluster-overhead.sh [ROUNDS] [RUNTIME_SECONDS]
# Results: bench/out/cluster-overhead.md (and the per-round fio JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-6}
RUNTIME=${2:-5}
OUT=bench/out/cluster-overhead; mkdir -p "$OUT"; rm -f "$OUT"/*.json
WORK=$(mktemp -d /var/tmp/dlsm-cluster-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
for t in fio curl python3 etcd; do command -v $t >/dev/null || { echo "missing $t (run scripts/test.sh)"; exit 1; }; done

cargo build --release --quiet --features cluster --bin dlsm
DLSM=target/release/dlsm
etcd --data-dir "$WORK/etcd" --listen-client-urls http://127.0.0.1:22379 \
  --advertise-client-urls http://127.0.0.1:22379 --listen-peer-urls http://127.0.0.1:22380 \
  --initial-advertise-peer-urls http://127.0.0.1:22380 --initial-cluster default=http://127.0.0.1:22380 \
  >"$WORK/etcd.log" 2>&1 &
for _ in $(seq 100); do curl -sf http://127.0.0.1:22379/health >/dev/null && break; sleep 0.1; done

"$DLSM" serve --data-dir "$WORK/peer" --listen 127.0.0.1:21909 --api 127.0.0.1:21950 --node peer >"$WORK/peer.log" 2>&1 &
"$DLSM" serve --data-dir "$WORK/c1" --listen 127.0.0.1:21910 --api 127.0.0.1:21951 --node c1 \
  --cluster-etcd http://127.0.0.1:22379 >"$WORK/c1.log" 2>&1 &
for api in 21950 21951; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$api/v1/node" >/dev/null && break; sleep 0.2; done
  "$DLSM" --api "127.0.0.1:$api" volume create bench --size 1G >/dev/null
done
"$DLSM" --api 127.0.0.1:21951 node info | grep -i lease || true
declare -A URI=([peer]=nbd://127.0.0.1:21909/bench [cluster]=nbd://127.0.0.1:21910/bench)
# Allocate every block first, so both arms overwrite allocated blocks.
for arm in peer cluster; do
  fio --name=fill --ioengine=nbd --uri="${URI[$arm]}" --rw=write --bs=1m --iodepth=8 --size=1G --output=/dev/null
done

JOBS=("randwrite-4k-qd32 randwrite 4k 32" "randwrite-4k-qd1 randwrite 4k 1" "randread-4k-qd32 randread 4k 32")
ARMS=(peer cluster)
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order=(peer cluster); else order=(cluster peer); fi
  for job in "${JOBS[@]}"; do
    set -- $job
    for arm in "${order[@]}"; do
      fio --name="$1" --ioengine=nbd --uri="${URI[$arm]}" --rw="$2" --bs="$3" --iodepth="$4" \
        --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --output-format=json --output="$OUT/$1-$arm-$r.json" >/dev/null
    done
  done
done
# The cluster node must still hold its lease (a bench of a node that lost
# it would measure EIOs).
curl -sf http://127.0.0.1:21951/v1/node | python3 -c 'import json,sys; c=json.load(sys.stdin)["cluster"]; assert c and c.get("lease_valid"), c; print("lease still valid:", c.get("lease_valid"))'

python3 - "$OUT" "$ROUNDS" <<'PY' | tee bench/out/cluster-overhead.md
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
jobs = ["randwrite-4k-qd32", "randwrite-4k-qd1", "randread-4k-qd32"]
def iops(job, arm, r):
    d = json.load(open(f"{out}/{job}-{arm}-{r}.json"))["jobs"][0]
    assert d["error"] == 0, (job, arm, r, d["error"])
    return d["write"]["iops"] + d["read"]["iops"]
print("| job | peer median IOPS | cluster median IOPS | cluster / peer | per round |")
print("|---|---:|---:|---:|---:|")
for j in jobs:
    p = [iops(j, "peer", r) for r in range(1, rounds + 1)]
    c = [iops(j, "cluster", r) for r in range(1, rounds + 1)]
    per = [ci / pi for ci, pi in zip(c, p)]
    print(f"| {j} | {statistics.median(p):,.0f} | {statistics.median(c):,.0f} | "
          f"{statistics.median(c) / statistics.median(p):.2f} | {min(per):.2f}-{max(per):.2f} |")
PY
