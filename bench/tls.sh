#!/usr/bin/env bash
# NBD over TLS: nbdcopy (libnbd, gnutls) reading and writing a 1 GiB volume
# served by dlsm (rustls), qemu-nbd and nbdkit, all with mutual TLS from the
# same certificate directory, plus dlsm in plain text for the cost of TLS.
# Three rounds each; the median is reported.
# Usage: bench/tls.sh    (results: bench/out/tls.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out; mkdir -p "$OUT"
WORK=$(mktemp -d /var/tmp/dlsm-tls.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
for t in nbdcopy qemu-nbd nbdkit openssl; do command -v $t >/dev/null || { echo "missing $t (run scripts/test.sh)"; exit 1; }; done
cargo build --release --quiet
DLSM=target/release/dlsm
TLS=$WORK/tls
bash tests/tls/make-certs.sh "$TLS" 127.0.0.1 localhost

head -c 1G /dev/urandom > "$WORK/src.raw"
cp "$WORK/src.raw" "$WORK/qemu.raw"; cp "$WORK/src.raw" "$WORK/nbdkit.raw"
$DLSM --tls-dir "$TLS" serve --data-dir "$WORK/dlsm" --listen 127.0.0.1:21809 --api 127.0.0.1:21750 --node tls >"$WORK/dlsm.log" 2>&1 &
$DLSM serve --data-dir "$WORK/plain" --listen 127.0.0.1:21812 --api 127.0.0.1:21751 --node plain >"$WORK/plain.log" 2>&1 &
sleep 1
$DLSM --tls-dir "$TLS" --api 127.0.0.1:21750 volume create bench --from "$WORK/src.raw" >/dev/null
$DLSM --api 127.0.0.1:21751 volume create bench --from "$WORK/src.raw" >/dev/null
qemu-nbd -f raw -x bench -p 21810 -b 127.0.0.1 -t -e 64 --cache=writeback --aio=threads \
  --object tls-creds-x509,id=tls0,dir="$TLS",endpoint=server,verify-peer=on --tls-creds tls0 "$WORK/qemu.raw" &
nbdkit -f -p 21811 -i 127.0.0.1 -e bench --tls=require --tls-certificates="$TLS" --tls-verify-peer \
  file file="$WORK/nbdkit.raw" &
sleep 1
declare -A URI=(
  [dlsm]="nbds://127.0.0.1:21809/bench?tls-certificates=$TLS"
  [qemu-nbd]="nbds://127.0.0.1:21810/bench?tls-certificates=$TLS"
  [nbdkit]="nbds://127.0.0.1:21811/bench?tls-certificates=$TLS"
  [dlsm-plain]="nbd://127.0.0.1:21812/bench"
)
SERVERS=(dlsm qemu-nbd nbdkit dlsm-plain)
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
median() { printf '%s\n' "$@" | sort -g | sed -n 2p; }
declare -A READ WRITE
for s in "${SERVERS[@]}"; do nbdcopy "${URI[$s]}" null: ; done   # warm up
for s in "${SERVERS[@]}"; do
  r=(); w=()
  for i in 1 2 3; do
    sync
    r+=("$(secs nbdcopy --connections=1 --requests=16 "${URI[$s]}" null:)")
    sync
    w+=("$(secs nbdcopy --connections=1 --requests=16 "$WORK/src.raw" "${URI[$s]}")")
  done
  READ[$s]=$(median "${r[@]}"); WRITE[$s]=$(median "${w[@]}")
done
{
  echo "| server | read 1 GiB (s) | MiB/s | write 1 GiB (s) | MiB/s |"
  echo "|---|---|---|---|---|"
  for s in "${SERVERS[@]}"; do
    printf '| %s | %.2f | %.0f | %.2f | %.0f |\n' "$s" "${READ[$s]}" "$(echo "1024/${READ[$s]}" | bc -l)" \
      "${WRITE[$s]}" "$(echo "1024/${WRITE[$s]}" | bc -l)"
  done
  best_r=$(printf '%s\n' "${READ[qemu-nbd]}" "${READ[nbdkit]}" | sort -g | head -1)
  best_w=$(printf '%s\n' "${WRITE[qemu-nbd]}" "${WRITE[nbdkit]}" | sort -g | head -1)
  printf '\ndlsm TLS throughput / best TLS peer: read %.2fx, write %.2fx\n' \
    "$(echo "$best_r/${READ[dlsm]}" | bc -l)" "$(echo "$best_w/${WRITE[dlsm]}" | bc -l)"
  printf 'dlsm TLS / dlsm plain throughput: read %.2fx, write %.2fx\n' \
    "$(echo "${READ[dlsm-plain]}/${READ[dlsm]}" | bc -l)" "$(echo "${WRITE[dlsm-plain]}/${WRITE[dlsm]}" | bc -l)"
} | tee "$OUT/tls.md"
