#!/usr/bin/env bash
# Runs every dlsm test. Installs what the tests need first (Debian packages),
# so it works on a fresh machine. A test whose tool is missing fails; none skip.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package
declare -A PKG=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdkit]=nbdkit
  [fio]=fio [ip]=iproute2 [tc]=iproute2 [cpio]=cpio [gcc]=gcc [xz]=xz-utils
  [openssl]=openssl [g++]=g++
  [groff]=groff-base [man]=man-db [script]=bsdutils [systemd-analyze]=systemd [bash]=bash
  [chromium]=chromium [chromedriver]=chromium-driver
  [promtool]=prometheus [prometheus]=prometheus
  [qemu-storage-daemon]=qemu-system-common
  [protoc]=protobuf-compiler [etcd]=etcd-server [etcdctl]=etcd-client
  [strace]=strace
)
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_install() {
  [ $updated = 1 ] || { $SUDO apt-get update -qq; updated=1; }
  echo "== installing test dependencies: $*"
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# The VM tests need QEMU's system emulator, a kernel and busybox. Installing
# Debian's qemu-system-x86 replaces a newer qemu-utils, so qemu-utils is
# installed again right after it.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  apt_install qemu-system-x86
  apt_install qemu-utils
fi
ls /boot/vmlinuz-* >/dev/null 2>&1 || apt_install linux-image-amd64
# A static busybox (the guest has no libc of its own).
if [ ! -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then apt_install busybox-static; fi
missing=()
for tool in "${!PKG[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PKG[$tool]}")
done
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || missing+=(python3-libnbd)
# The cluster feature's etcd client compiles etcd's protos, which import
# google/protobuf/*.proto: protobuf-compiler only recommends the package
# that has them, and --no-install-recommends leaves it out.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2046
  apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd fuzz && cargo fmt --all -- --check)
echo "== cargo clippy -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
echo "== cargo clippy -D warnings, with the cluster feature"
cargo clippy --all-targets --features cluster --quiet -- -D warnings
echo "== cargo test"
cargo test --all-targets -- --test-threads="${DLSM_TEST_THREADS:-2}" --skip chaos
# Cluster mode against a real etcd (the feature is off by default, so the
# run above built without it).
echo "== cluster tests (--features cluster)"
cargo test --features cluster --test cluster -- --test-threads="${DLSM_TEST_THREADS:-2}"
# The etcd nemesis: cluster-mode nodes under etcd member, lease, link and
# node faults, on its own so its summary line shows; a failing seed prints
# the command that reruns it.
echo "== etcd nemesis (--features cluster; one random seed; DLSM_CHAOS_SEED=S to pick one)"
cargo test --features cluster --test chaos_etcd -- --nocapture
# The randomized fault-and-operator harness on its own, so its summary line
# (seed, faults by kind, bytes checked, violations) shows in the log; a
# failing seed prints the one-line command that reruns it.
echo "== chaos harness (one random seed; DLSM_CHAOS_SEED=S to pick one)"
cargo test --test chaos -- --nocapture
echo "== fuzzing, ${DLSM_FUZZ_SECONDS:-20} s per target (scripts/fuzz.sh)"
bash scripts/fuzz.sh "${DLSM_FUZZ_SECONDS:-20}"
