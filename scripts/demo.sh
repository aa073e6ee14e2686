#!/usr/bin/env bash
# The main job for now: bootstrap a trust root in a temporary directory and issue one X509-SVID
# for a CSR made by openssl, then verify it with openssl. Everything stays in a temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
SIGIL="${SIGIL_BIN:-$PWD/.build/debug/sigil}"
work="$(mktemp -d /tmp/sigil-demo.XXXXXX)"
id="spiffe://demo.sigil/ns/default/sa/web"

echo "==> sigil ca init --trust-domain demo.sigil --data-dir $work/ca"
"$SIGIL" ca init --trust-domain demo.sigil --data-dir "$work/ca"

echo "==> openssl makes a P-256 key and CSR (the key never leaves $work)"
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/web.key" -subj "/CN=web" -out "$work/web.csr" 2>/dev/null

echo "==> sigil ca sign --spiffe-id $id --ttl 1h"
"$SIGIL" ca sign --data-dir "$work/ca" --csr "$work/web.csr" --spiffe-id "$id" --ttl 1h > "$work/web.pem"

echo "==> openssl verify -x509_strict against the trust bundle"
openssl verify -x509_strict -purpose sslclient -CAfile "$work/ca/bundle.pem" -untrusted "$work/web.pem" "$work/web.pem"
openssl verify -x509_strict -purpose sslserver -CAfile "$work/ca/bundle.pem" -untrusted "$work/web.pem" "$work/web.pem"

echo
echo "Summary"
openssl x509 -in "$work/web.pem" -noout -serial -subject -issuer -dates -ext subjectAltName,basicConstraints,keyUsage,extendedKeyUsage | sed 's/^/  /'
echo
"$SIGIL" ca status --data-dir "$work/ca"
echo
echo "files: $work (CA in ca/, SVID web.pem, key web.key)"
