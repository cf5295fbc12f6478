#!/bin/bash
# Makes a TLS directory in the layout QEMU, libnbd and `dlsm serve --tls-dir`
# share: a CA, a server certificate valid for the given addresses, and a
# client certificate, all signed by that CA. EXTRA_CLIENTS="a b" also makes
# a-cert.pem/a-key.pem, b-cert.pem/b-key.pem: more client identities.
#
#   make-certs.sh DIR [IP-or-NAME ...]     (default: 127.0.0.1 localhost)
set -euo pipefail
dir=$1; shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(127.0.0.1 localhost)
mkdir -p "$dir"
cd "$dir"
san=""
for n in "${names[@]}"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 3650 -subj "/CN=dlsm test CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca-cert.pem
sign() { # name cn extensions
    key "$1-key.pem"
    openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
        -days 3650 -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
sign server "${names[0]}" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
for c in client ${EXTRA_CLIENTS:-}; do
    sign "$c" "dlsm $c" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
done
chmod 600 ./*-key.pem
