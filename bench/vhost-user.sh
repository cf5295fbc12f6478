#!/usr/bin/env bash
# vhost-user-blk benchmark, in one run on the same 1 GiB random-filled data
# (one copy per peer):
#   dlsm-vhost  examples/vhost_user_bench against dlsm's vhost-user-blk socket
#               (dlsm serve --vhost-user-dir DIR, volume created --from the data)
#   dlsm-nbd    fio's nbd engine against the same node's NBD export, same volume
#   qemu-img    qemu-img bench on a local raw file: QEMU's block layer with the
#               page cache, as a guest's virtio-blk on a local file gets it by
#               default (-t writeback -i threads; QEMU's default aio is
#               threads). qemu-img bench has no random mode: "random" rows
#               step through the file by 104729 blocks (a prime, so every
#               block is visited once per pass, in scattered order). It
#               reports no latencies: mean latency = depth / IOPS.
#   qsd-vhost   examples/vhost_user_bench against qemu-storage-daemon's
#               vhost-user-blk export of a local raw file (cache.direct=off,
#               aio=threads): a reference vhost-user-blk server.
# CPU per I/O: node = utime+stime of the dlsm / qemu-storage-daemon process
# (from /proc/PID/stat) over the measured window; client = the example's
# getrusage, fio's usr+sys, or /usr/bin/time for qemu-img (whole process:
# qemu-img is client and "node" in one).
# Usage: bench/vhost-user.sh [--runtime SECONDS] [--queues N]
#        (results: bench/out/vhost-user.md, raw data in bench/out/vhost-user/)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=10 QUEUES=1 RAMP=1
while [ $# -gt 0 ]; do
  case $1 in
    --runtime) RUNTIME=$2; shift 2 ;;
    --queues) QUEUES=$2; shift 2 ;;
    [0-9]*) RUNTIME=$1; shift ;;
    *) echo "usage: $0 [--runtime SECONDS] [--queues N]"; exit 2 ;;
  esac
done
OUT=bench/out; RAW=$OUT/vhost-user; mkdir -p "$RAW"; rm -f "$RAW"/*
WORK=$(mktemp -d /var/tmp/dlsm-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$WORK"' EXIT
for t in fio qemu-img qemu-storage-daemon python3 /usr/bin/time; do
  command -v $t >/dev/null || { echo "missing $t (run scripts/test.sh)"; exit 1; }
done
cargo build --release --quiet --bin dlsm --example vhost_user_bench
DLSM=target/release/dlsm
BENCH=target/release/examples/vhost_user_bench
NBD_PORT=20812 API_PORT=20752
TICK=$(getconf CLK_TCK)

head -c 1G /dev/urandom > "$WORK/src.raw"
cp "$WORK/src.raw" "$WORK/qemu-img.raw"; cp "$WORK/src.raw" "$WORK/qsd.raw"; sync

mkdir -p "$WORK/vhost"
DLSM_VHOST_ERROR=
start_dlsm() {
  $DLSM serve --data-dir "$WORK/dlsm" --listen 127.0.0.1:$NBD_PORT --api 127.0.0.1:$API_PORT \
    --node bench "$@" >"$WORK/dlsm.log" 2>&1 &
  DLSM_PID=$!
  sleep 1
  kill -0 $DLSM_PID 2>/dev/null
}
if ! start_dlsm --vhost-user-dir "$WORK/vhost"; then
  DLSM_VHOST_ERROR="dlsm serve --vhost-user-dir failed: $(grep -m1 -i error "$WORK/dlsm.log" || head -1 "$WORK/dlsm.log")"
  echo "$DLSM_VHOST_ERROR" >&2
  echo "(running the dlsm NBD rows without the vhost-user export)" >&2
  start_dlsm || { cat "$WORK/dlsm.log"; exit 1; }
fi
$DLSM --api 127.0.0.1:$API_PORT volume create bench --from "$WORK/src.raw" >/dev/null
if [ -z "$DLSM_VHOST_ERROR" ]; then
  for _ in $(seq 50); do [ -S "$WORK/vhost/bench" ] && break; sleep 0.1; done
  [ -S "$WORK/vhost/bench" ] || DLSM_VHOST_ERROR="no socket $WORK/vhost/bench after volume create"
fi

qemu-storage-daemon \
  --blockdev driver=file,node-name=f,filename="$WORK/qsd.raw",cache.direct=off,aio=threads \
  --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="$WORK/qsd.sock",writable=on,num-queues=$QUEUES \
  >"$WORK/qsd.log" 2>&1 &
QSD_PID=$!
for _ in $(seq 50); do [ -S "$WORK/qsd.sock" ] && break; sleep 0.1; done
[ -S "$WORK/qsd.sock" ] || { echo "qemu-storage-daemon did not start:"; cat "$WORK/qsd.log"; exit 1; }

# Start everyone from the same page-cache state (see nbd-serve.sh), then warm
# it the same way: one sequential 1 MiB read pass over each copy.
sync; echo 3 > /proc/sys/vm/drop_caches || { echo "need root to drop caches"; exit 1; }
fio --name=warm --ioengine=nbd --uri=nbd://127.0.0.1:$NBD_PORT/bench --rw=read --bs=1m --iodepth=8 \
    --size=1G --output=/dev/null
dd if="$WORK/qemu-img.raw" of=/dev/null bs=1M status=none
dd if="$WORK/qsd.raw" of=/dev/null bs=1M status=none

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure NODE_PID PREFIX CMD...: runs CMD, samples the node's CPU ticks over
# [RAMP, RAMP+RUNTIME] of its run; writes PREFIX.{out,err,rc,node}.
measure() {
  local pid=$1 pre=$2 cpid rc t0 t1; shift 2
  "$@" >"$pre.out" 2>"$pre.err" &
  cpid=$!
  sleep "$RAMP"; t0=$(cpu_ticks "$pid")
  sleep "$RUNTIME"; t1=$(cpu_ticks "$pid")
  wait $cpid && rc=0 || rc=$?
  echo "$rc" >"$pre.rc"
  python3 -c "print(($t1 - $t0) / $TICK)" >"$pre.node"
}

JOBS=(
  "randread-4k-qd1 randread 4k 1"
  "randwrite-4k-qd1 randwrite 4k 1"
  "randread-4k-qd32 randread 4k 32"
  "randwrite-4k-qd32 randwrite 4k 32"
  "seqread-1m-qd8 read 1m 8"
  "seqwrite-1m-qd8 write 1m 8"
)
PEERS=(dlsm-vhost dlsm-nbd qemu-img qsd-vhost)

run_bench_example() { # SOCKET PATTERN BS DEPTH
  $BENCH --socket "$1" --pattern "$2" --bs "$3" --depth "$4" --queues "$QUEUES" \
    --runtime "$RUNTIME" --ramp "$RAMP"
}

run_qemu_img() { # PREFIX PATTERN BS DEPTH
  local pre=$1 pat=$2 bs=$3 depth=$4 args count secs
  local bsb
  case $bs in *k) bsb=$((${bs%k} * 1024)) ;; *m) bsb=$((${bs%m} * 1048576)) ;; *) bsb=$bs ;; esac
  args=(-f raw -t writeback -i threads -d "$depth" -s "$bsb" --pattern=165)
  case $pat in randread|randwrite) args+=(-S $((bsb * 104729))) ;; esac
  case $pat in randwrite|write) args+=(-w) ;; esac
  # Calibrate the count on a short run (which also warms up), then run for
  # about RUNTIME seconds.
  count=$(( bsb >= 1048576 ? 1000 : 20000 ))
  secs=$(qemu-img bench "${args[@]}" -c $count "$WORK/qemu-img.raw" | sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p')
  count=$(python3 -c "print(max(1000, int($count * $RUNTIME / max($secs, 0.001))))")
  /usr/bin/time -f '{"user": %U, "sys": %S, "elapsed": %e}' -o "$pre.time" \
    qemu-img bench "${args[@]}" -c "$count" "$WORK/qemu-img.raw" >"$pre.out" 2>"$pre.err" \
    && echo 0 >"$pre.rc" || echo $? >"$pre.rc"
  echo "$count" >"$pre.count"
}

# Job-major order, dirty pages written back before every run, so that no
# peer pays for another's writeback.
for job in "${JOBS[@]}"; do
  set -- $job
  name=$1 pat=$2 bs=$3 depth=$4
  for peer in "${PEERS[@]}"; do
    sync; sleep 1
    pre="$RAW/$peer-$name"
    echo "== $name $peer" >&2
    case $peer in
      dlsm-vhost)
        if [ -n "$DLSM_VHOST_ERROR" ]; then
          echo "$DLSM_VHOST_ERROR" >"$pre.err"; echo 1 >"$pre.rc"; echo 0 >"$pre.node"; : >"$pre.out"
        else
          measure "$DLSM_PID" "$pre" run_bench_example "$WORK/vhost/bench" "$pat" "$bs" "$depth"
        fi ;;
      dlsm-nbd)
        measure "$DLSM_PID" "$pre" fio --name="$name" --ioengine=nbd --uri=nbd://127.0.0.1:$NBD_PORT/bench \
          --rw="$pat" --bs="$bs" --iodepth="$depth" --size=1G --time_based --runtime="$RUNTIME" \
          --ramp_time="$RAMP" --randrepeat=0 --lat_percentiles=1 --output-format=json ;;
      qemu-img)
        run_qemu_img "$pre" "$pat" "$bs" "$depth" ;;
      qsd-vhost)
        measure "$QSD_PID" "$pre" run_bench_example "$WORK/qsd.sock" "$pat" "$bs" "$depth" ;;
    esac
    if [ "$(cat "$pre.rc")" != 0 ]; then echo "   FAILED: $(tail -1 "$pre.err")" >&2; fi
  done
done

python3 - "$RAW" "$OUT/vhost-user.md" "$RUNTIME" "$QUEUES" "${JOBS[@]}" <<'PY'
import json, os, sys
raw, md, runtime, queues = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
jobs = [j.split() for j in sys.argv[5:]]
peers = ["dlsm-vhost", "dlsm-nbd", "qemu-img", "qsd-vhost"]

def rd(p, default=""):
    try:
        return open(p).read().strip()
    except OSError:
        return default

def load(peer, job):
    name, pat, bs, depth = job
    pre = os.path.join(raw, f"{peer}-{name}")
    if rd(pre + ".rc") != "0":
        err = rd(pre + ".err").splitlines()
        return {"error": (err[-1] if err else "failed")[:160]}
    node = float(rd(pre + ".node", "nan") or "nan")
    if peer in ("dlsm-vhost", "qsd-vhost"):
        d = json.loads(rd(pre + ".out").splitlines()[-1])
        return {"iops": d["iops"], "lat": d["lat_mean_us"], "p50": d["lat_p50_us"],
                "p99": d["lat_p99_us"], "client": d["cpu_us_per_io"],
                "node": node * 1e6 / d["ios"] if d["ios"] else None}
    if peer == "dlsm-nbd":
        s = rd(pre + ".out")  # fio's nbd engine prints a line before the JSON
        j = json.loads(s[s.index("{"):])["jobs"][0]
        side = j["read"] if "read" in pat else j["write"]
        ios = side["total_ios"]
        cpu_s = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
        pct = side["lat_ns"].get("percentile", {})
        return {"iops": side["iops"], "lat": side["lat_ns"]["mean"] / 1e3,
                "p50": pct.get("50.000000", float("nan")) / 1e3,
                "p99": pct.get("99.000000", float("nan")) / 1e3,
                "client": cpu_s * 1e6 / ios if ios else None,
                "node": node * 1e6 / ios if ios else None}
    if peer == "qemu-img":
        count = int(rd(pre + ".count"))
        secs = float([l for l in rd(pre + ".out").splitlines() if "Run completed" in l][0].split()[3])
        t = json.loads(rd(pre + ".time"))
        iops = count / secs
        return {"iops": iops, "lat": int(depth) / iops * 1e6, "p50": None, "p99": None,
                "client": (t["user"] + t["sys"]) * 1e6 / count, "node": None}

R = {(p, j[0]): load(p, j) for j in jobs for p in peers}

def f(v, fmt="{:,.1f}"):
    return "–" if v is None or v != v else fmt.format(v)

lines = [f"# vhost-user-blk benchmark ({runtime:g} s per row, {queues} queue(s), 1 GiB)", "",
         "Latency in µs (qemu-img: depth/IOPS, no percentiles); CPU in µs per I/O.", "",
         "| job | peer | IOPS | MiB/s | mean lat | p50 | p99 | node CPU/IO | client CPU/IO |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
for name, pat, bs, depth in jobs:
    bsb = int(bs[:-1]) * (1024 if bs[-1] == "k" else 1048576)
    for p in peers:
        r = R[(p, name)]
        if "error" in r:
            lines.append(f"| {name} | {p} | FAILED: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {name} | {p} | {f(r['iops'], '{:,.0f}')} | {f(r['iops'] * bsb / 1048576, '{:,.0f}')} "
                     f"| {f(r['lat'])} | {f(r['p50'])} | {f(r['p99'])} | {f(r['node'], '{:.2f}')} | {f(r['client'], '{:.2f}')} |")

def ratio(a, b, key, goal, better):
    ra, rb = R[a], R[b]
    if "error" in ra or "error" in rb:
        return "–", "n/a"
    x = ra[key] / rb[key]
    ok = x >= goal if better == "ge" else x <= goal
    return f"{x:.2f}x", "yes" if ok else "**no**"

lines += ["", "| ratio | goal | dlsm-vhost | met | qsd-vhost (reference) | met |", "|---|---|---:|---|---:|---|"]
def row(label, goal_s, goal, better, key, job, base):
    a = ratio(("dlsm-vhost", job), (base, job), key, goal, better)
    b = ratio(("qsd-vhost", job), (base, job), key, goal, better)
    lines.append(f"| {label} | {goal_s} | {a[0]} | {a[1]} | {b[0]} | {b[1]} |")
for job in ("randread-4k-qd32", "randwrite-4k-qd32"):
    row(f"IOPS vs dlsm-nbd, {job}", "≥1.5x", 1.5, "ge", "iops", job, "dlsm-nbd")
for job in ("randread-4k-qd1", "randwrite-4k-qd1"):
    row(f"mean latency vs dlsm-nbd, {job}", "≤0.6x", 0.6, "le", "lat", job, "dlsm-nbd")
for name, *_ in jobs:
    row(f"IOPS vs qemu-img bench, {name}", "≥1.0x", 1.0, "ge", "iops", name, "qemu-img")
table = "\n".join(lines)
print(table)
open(md, "w").write(table + "\n")
PY
