#!/usr/bin/env bash
# The main job, all on loopback in a temporary directory:
#   1. bootstrap a trust root; issue one X509-SVID for a CSR made by openssl; verify it with openssl;
#   2. run the CA server and a node agent; register this shell's uid; fetch the workload's SVID over
#      the SPIFFE Workload API (as any SPIFFE client would) and verify it.
set -euo pipefail
cd "$(dirname "$0")/.."
SIGIL="${SIGIL_BIN:-$PWD/.build/debug/sigil}"
work="$(mktemp -d /tmp/sigil-demo.XXXXXX)"
port=$((20000 + RANDOM % 20000))
id="spiffe://demo.sigil/ns/default/sa/web"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

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
openssl x509 -in "$work/web.pem" -noout -serial -dates -ext subjectAltName,basicConstraints,keyUsage,extendedKeyUsage | sed 's/^/  /'

echo
echo "==> sigil server run (agent API on 127.0.0.1:$port, admin socket $work/admin.sock)"
export SIGIL_ADMIN_SOCKET="$work/admin.sock"
"$SIGIL" server run --data-dir "$work/ca" --listen "127.0.0.1:$port" --log-level warning &
pids+=($!)
for _ in $(seq 100); do [ -S "$SIGIL_ADMIN_SOCKET" ] && break; sleep 0.1; done

echo "==> sigil entry create: uid $(id -u) on node-1 gets spiffe://demo.sigil/ns/default/sa/api"
"$SIGIL" entry create --spiffe-id spiffe://demo.sigil/ns/default/sa/api --parent node-1 --selector "unix:uid:$(id -u)" --ttl 1h

echo "==> sigil agent run, attesting with a single-use join token"
token="$("$SIGIL" token create --agent-id node-1 --ttl 5m)"
"$SIGIL" agent run --server "127.0.0.1:$port" --join-token "$token" --trust-bundle "$work/ca/bundle.pem" \
    --socket "$work/agent.sock" --data-dir "$work/agent" --log-level warning &
pids+=($!)

echo "==> sigil svid fetch over the SPIFFE Workload API (caller attested by SO_PEERCRED)"
for _ in $(seq 100); do "$SIGIL" svid fetch --socket "$work/agent.sock" --write "$work/fetched" >/dev/null 2>&1 && break; sleep 0.2; done
"$SIGIL" svid fetch --socket "$work/agent.sock"
openssl verify -x509_strict -CAfile "$work/fetched/bundle.pem" -untrusted "$work/fetched/svid.pem" "$work/fetched/svid.pem"

echo
"$SIGIL" agent list
echo
"$SIGIL" ca status --data-dir "$work/ca"
echo
echo "files: $work"
