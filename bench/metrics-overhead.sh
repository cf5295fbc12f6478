#!/usr/bin/env bash
# Metrics and dashboard overhead: fio's nbd engine against one dlsm node,
# in alternating rounds with and without a scraper hitting /metrics every
# SCRAPE_INTERVAL seconds (default 1) and a dashboard's event stream open. With BASE=REV (a commit before /metrics existed,
# e.g. dc48037) a node built from REV serves its own copy of the file in a
# third arm, which measures what the always-on request counting costs.
#
# Usage: [BASE=REV] [SCRAPE_INTERVAL=S] bench/metrics-overhead.sh [ROUNDS] [RUNTIME_SECONDS]
# Results: bench/out/metrics-overhead.md (and the per-round fio JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-6}
RUNTIME=${2:-5}
INTERVAL=${SCRAPE_INTERVAL:-1}
OUT=bench/out/metrics-overhead; mkdir -p "$OUT"; rm -f "$OUT"/*.json
WORK=$(mktemp -d /var/tmp/dlsm-metrics-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
for t in fio curl python3; do command -v $t >/dev/null || { echo "missing $t (run scripts/test.sh)"; exit 1; }; done

# Only the binary, in release.
cargo build --release --quiet --bin dlsm
cp target/release/dlsm "$WORK/dlsm-new"
ARMS=(off on)
if [ -n "${BASE:-}" ]; then
  # Built in this tree's target dir (dependencies shared), from a fixed
  # path so that a rerun rebuilds nothing.
  src=target/bench-base/src
  rm -rf "$src"; mkdir -p "$src"
  git archive "$BASE" | tar -x -C "$src"
  (cd "$src" && CARGO_TARGET_DIR="$OLDPWD/target/bench-base/target" cargo build --release --quiet --bin dlsm)
  cp target/bench-base/target/release/dlsm "$WORK/dlsm-base"
  ARMS+=(base)
fi

head -c 1G /dev/urandom > "$WORK/src.raw"
start_node() { # name binary nbd-port api-port
  "$2" serve --data-dir "$WORK/$1" --listen "127.0.0.1:$3" --api "127.0.0.1:$4" --node "$1" >"$WORK/$1.log" 2>&1 &
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$4/v1/node" >/dev/null && break; sleep 0.2; done
  "$2" --api "127.0.0.1:$4" volume create bench --from "$WORK/src.raw" >/dev/null
}
start_node new "$WORK/dlsm-new" 21809 21750
declare -A URI=([off]=nbd://127.0.0.1:21809/bench [on]=nbd://127.0.0.1:21809/bench)
if [ -n "${BASE:-}" ]; then
  start_node base "$WORK/dlsm-base" 21810 21751
  URI[base]=nbd://127.0.0.1:21810/bench
fi
sync
for arm in "${ARMS[@]}"; do
  fio --name=warm --ioengine=nbd --uri="${URI[$arm]}" --rw=read --bs=1m --iodepth=8 --size=1G --output=/dev/null
done

JOBS=("randread-4k-qd32 randread 4k 32" "randread-4k-qd1 randread 4k 1" "randwrite-4k-qd32 randwrite 4k 32")
scraper=""
viewer=""
# `on`: Prometheus-style scrapes and one dashboard open (its event stream,
# a frame every 500 ms, read by curl as a browser would).
scrape_on() {
  ( while :; do
      curl -s -o /dev/null -w '%{http_code}\n' http://127.0.0.1:21750/metrics >>"$WORK/scrapes"
      sleep "$INTERVAL"
    done ) &
  scraper=$!
  curl -sN http://127.0.0.1:21750/v1/events >>"$WORK/events" 2>/dev/null &
  viewer=$!
}
scrape_off() {
  [ -z "$scraper" ] || { kill "$scraper"; wait "$scraper" 2>/dev/null || true; scraper=""; }
  [ -z "$viewer" ] || { kill "$viewer"; wait "$viewer" 2>/dev/null || true; viewer=""; }
}

for job in "${JOBS[@]}"; do
  set -- $job
  for r in $(seq "$ROUNDS"); do
    # Rotate which arm goes first, so that drift on the shared host does
    # not always land on the same arm.
    n=${#ARMS[@]}; order=()
    for i in $(seq 0 $((n - 1))); do order+=("${ARMS[$(((i + r) % n))]}"); done
    for arm in "${order[@]}"; do
      sync; sleep 1
      [ "$arm" = on ] && scrape_on
      fio --name="$1" --ioengine=nbd --uri="${URI[$arm]}" --rw="$2" --bs="$3" --iodepth="$4" \
          --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 \
          --output-format=json --output="$OUT/$1-$arm-$r.json"
      scrape_off
    done
  done
done
ok=$(grep -c '^200$' "$WORK/scrapes" || true); all=$(wc -l <"$WORK/scrapes")
[ "$ok" -gt 0 ] && [ "$ok" = "$all" ] || { echo "scrapes failed: $ok of $all answered 200"; exit 1; }
frames=$(grep -c '^data:' "$WORK/events" || true)
[ "$frames" -gt 0 ] || { echo "the dashboard stream sent no frame"; exit 1; }
echo "dashboard frames received: $frames"

python3 - "$OUT" "$ROUNDS" "$INTERVAL" "$ok" "${ARMS[*]}" "${JOBS[@]}" <<'PY'
import json, os, statistics as st, sys
out, rounds, interval, scrapes, arms = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5].split()
jobs = [j.split()[0] for j in sys.argv[6:]]
def iops(j, a, r):
    d = json.load(open(os.path.join(out, f"{j}-{a}-{r}.json")))["jobs"][0]
    return (d["read"] if "read" in j else d["write"])["iops"]
rows = [f"{rounds} rounds per arm; `on` = scraped every {interval} s ({scrapes} scrapes, all HTTP 200) with a dashboard open; "
        "ratios are to `off` (the same binary, not scraped), per round and of the medians", "",
        "| job | arm | IOPS median | min-max | / off (medians) | / off per round |",
        "|---|---|---:|---:|---:|---:|"]
for j in jobs:
    v = {a: [iops(j, a, r) for r in range(1, rounds + 1)] for a in arms}
    for a in arms:
        if a == "off":
            ratio = spread = ""
        else:
            per = [x / o for x, o in zip(v[a], v["off"])]
            ratio = f"{st.median(v[a]) / st.median(v['off']):.3f}"
            spread = f"{min(per):.2f}-{max(per):.2f}"
        rows.append(f"| {j} | {a} | {st.median(v[a]):,.0f} | {min(v[a]):,.0f}-{max(v[a]):,.0f} | {ratio} | {spread} |")
table = "\n".join(rows)
print(table)
open(os.path.join(os.path.dirname(out), "metrics-overhead.md"), "w").write(table + "\n")
PY
