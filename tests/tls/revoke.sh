#!/bin/bash
# Revokes certificates of a TLS directory made by make-certs.sh, as an
# operator would after a host is compromised: writes DIR/ca-crl.pem, the
# optional CRL that QEMU, libnbd and dlsm read from the same directory.
#
#   revoke.sh DIR CERT.pem [CERT.pem ...]    (paths relative to DIR)
set -euo pipefail
dir=$1; shift
cd "$dir"
db=$(mktemp -d)
trap 'rm -rf "$db"' EXIT
cat > "$db/ca.cnf" <<CNF
[ ca ]
default_ca = dlsm_ca
[ dlsm_ca ]
database = $db/index.txt
crlnumber = $db/crlnumber
default_md = sha256
default_crl_days = 3650
CNF
touch "$db/index.txt"
echo 01 > "$db/crlnumber"
for cert in "$@"; do
    openssl ca -config "$db/ca.cnf" -keyfile ca-key.pem -cert ca-cert.pem -revoke "$cert" 2>/dev/null
done
openssl ca -config "$db/ca.cnf" -keyfile ca-key.pem -cert ca-cert.pem -gencrl -out ca-crl.pem 2>/dev/null
