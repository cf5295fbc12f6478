#!/usr/bin/env bash
# Builds the test guest: Debian's kernel plus an initramfs made of
# busybox-static, the virtio modules and the workload (static C).
# Usage: tests/vm/build-initramfs.sh OUTDIR   -> OUTDIR/vmlinuz, OUTDIR/initramfs.gz
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-initramfs.sh OUTDIR}
mkdir -p "$out"
kver=$(ls /lib/modules | sort -V | tail -1)
[ -n "$kver" ] && [ -f "/boot/vmlinuz-$kver" ] || { echo "no kernel: apt-get install linux-image-amd64" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "no busybox: apt-get install busybox-static" >&2; exit 1; }
if ldd /bin/busybox >/dev/null 2>&1; then
  echo "/bin/busybox is dynamically linked: apt-get install busybox-static" >&2; exit 1
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  f=$(find "/lib/modules/$kver" -name "$m.ko*" | head -1)
  [ -n "$f" ] || continue   # built into the kernel
  case "$f" in
    *.ko.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
gcc -static -O2 -o "$root/bin/workload" "$here/workload.c"
gcc -static -O2 -pthread -o "$root/bin/diskbench" "$here/diskbench.c"
install -m 0755 "$here/init" "$root/init"
# Write then rename, so a reader never sees a half-written guest.
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
cp "/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "guest built: kernel $kver -> $out"
