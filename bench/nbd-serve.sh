#!/usr/bin/env bash
# NBD serving benchmark: fio's nbd engine against dlsm, qemu-nbd and nbdkit's
# file plugin, each serving the same 1 GiB random-filled file, in one run.
# Usage: bench/nbd-serve.sh [RUNTIME_SECONDS]   (results: bench/out/nbd-serve.md)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/dlsm-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
for t in fio qemu-nbd nbdkit; do command -v $t >/dev/null || { echo "missing $t (run scripts/test.sh)"; exit 1; }; done
cargo build --release --quiet
DLSM=target/release/dlsm

head -c 1G /dev/urandom > "$WORK/src.raw"
cp "$WORK/src.raw" "$WORK/qemu.raw"; cp "$WORK/src.raw" "$WORK/nbdkit.raw"; sync

$DLSM serve --data-dir "$WORK/dlsm" --listen 127.0.0.1:20809 --api 127.0.0.1:20750 --node bench >"$WORK/dlsm.log" 2>&1 &
sleep 1
$DLSM --api 127.0.0.1:20750 volume create bench --from "$WORK/src.raw" >/dev/null
qemu-nbd -f raw -x bench -p 20810 -b 127.0.0.1 -t -e 64 --cache=writeback --aio=threads "$WORK/qemu.raw" &
nbdkit -f -p 20811 -i 127.0.0.1 -e bench file file="$WORK/nbdkit.raw" &
sleep 1
# Start every server from the same page-cache state: how a file was written
# (1 MiB NBD writes vs cp) decides the folio sizes the kernel caches it in,
# and that alone changes 4 KiB write cost severalfold.
sync; echo 3 > /proc/sys/vm/drop_caches || { echo "need root to drop caches"; exit 1; }

declare -A URI=(
  [dlsm]=nbd://127.0.0.1:20809/bench
  [qemu-nbd]=nbd://127.0.0.1:20810/bench
  [nbdkit]=nbd://127.0.0.1:20811/bench
)
JOBS=(
  "randread-4k-qd32 randread 4k 32"
  "randwrite-4k-qd32 randwrite 4k 32"
  "randread-4k-qd1 randread 4k 1"
  "randwrite-4k-qd1 randwrite 4k 1"
  "seqread-1m-qd8 read 1m 8"
  "seqwrite-1m-qd8 write 1m 8"
)
for server in dlsm qemu-nbd nbdkit; do
  # Warm the page cache the same way for everyone.
  fio --name=warm --ioengine=nbd --uri="${URI[$server]}" --rw=read --bs=1m --iodepth=8 --size=1G --output=/dev/null
done
# Job-major order, and dirty pages written back before every run, so that no
# server pays for another's writeback.
for job in "${JOBS[@]}"; do
  set -- $job
  for server in dlsm qemu-nbd nbdkit; do
    sync; sleep 1
    fio --name="$1" --ioengine=nbd --uri="${URI[$server]}" --rw="$2" --bs="$3" --iodepth="$4" \
        --size=1G --time_based --runtime="$RUNTIME" --ramp_time=1 --randrepeat=0 \
        --output-format=json --output="$OUT/$server-$1.json"
  done
done
grep -E 'RSS|VmHWM' /proc/$(pgrep -f "dlsm serve --data-dir $WORK" | head -1)/status > "$OUT/dlsm-mem.txt" || true

python3 - "$OUT" "${JOBS[@]}" <<'PY'
import json, sys, os
out = sys.argv[1]
jobs = [j.split()[0] for j in sys.argv[2:]]
rows = ["| job | dlsm | qemu-nbd | nbdkit file | dlsm / best peer |", "|---|---:|---:|---:|---:|"]
for j in jobs:
    vals = {}
    for s in ["dlsm", "qemu-nbd", "nbdkit"]:
        d = json.load(open(os.path.join(out, f"{s}-{j}.json")))["jobs"][0]
        side = d["read"] if "read" in j else d["write"]
        vals[s] = side["iops"] if "4k" in j else side["bw_bytes"] / 1e9
    unit = "IOPS" if "4k" in j else "GB/s"
    fmt = (lambda v: f"{v:,.0f}") if unit == "IOPS" else (lambda v: f"{v:.2f} GB/s")
    best = max(vals["qemu-nbd"], vals["nbdkit"])
    rows.append(f"| {j} | {fmt(vals['dlsm'])} | {fmt(vals['qemu-nbd'])} | {fmt(vals['nbdkit'])} | {vals['dlsm']/best:.2f}x |")
table = "\n".join(rows)
print(table)
open(os.path.join(out, "nbd-serve.md"), "w").write(table + "\n")
PY
cat "$OUT/dlsm-mem.txt"
