#!/usr/bin/env bash
# CA benchmarks (not tests), one run on this machine, release builds, every figure beside the limit
# measured in the same run:
#   1. the limit: one ECDSA P-256 verify + one sign per SVID, `openssl speed ecdsap256` on one core
#      (and swift-crypto's, from sigil-bench);
#   2. the CA in process: CSR parse + verify, SVID build + sign, its row in SQLite (durable commit per
#      batch), batches of 64, 4 in flight, one core;
#   3. end to end through the agent API: a real `sigil server run` pinned to one core, an attested
#      agent's own SVID over mTLS, batches of 50 from 4 lanes (as 4 agents), durable SQLite commits;
#      and a lone SVID (batch of 1, nothing else in flight): the issuance latency a workload sees;
#   4. bootstrapping a trust root: `sigil ca init` beside the openssl commands for the same root →
#      intermediate → bundle (hyperfine).
#
#   bash bench/ca.sh            (or bash bench/run.sh ca)
# Prints markdown tables; writes bench/results/ca-<UTC date>.json (figures + goals).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
source bench/lib.sh
bench_install_peers
bench_build
S="$repo/.build/release/sigil"
B="$repo/.build/release/sigil-bench"
RESULT_JSON="${RESULT_JSON:-$repo/bench/results/ca-$(date -u +%Y-%m-%d).json}"
ncpu="$(nproc)"
pin0="taskset -c 0"; pinrest="taskset -c 1-$((ncpu - 1))"
((ncpu > 1)) || pinrest=""

work="$(mktemp -d /tmp/sigil-bench-ca.XXXXXX)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
get() { echo "$1" | awk -v k="$2" '$1 == k {print $2}'; }

echo "==> 1. openssl speed ecdsap256 (one core)" >&2
ossl="$($pin0 openssl speed -seconds 3 ecdsap256 2>/dev/null | awk '/256 bits ecdsa \(nistp256\)/ {print $(NF-1), $NF}')"
ossl_sign="${ossl% *}"; ossl_verify="${ossl#* }"

echo "==> 2. CA in process (sigil-bench sign, one core)" >&2
inproc="$($pin0 "$B" sign --count 20000 --batch 64 --seconds 3 --concurrency 4)"
echo "$inproc" >&2

echo "==> 3. end to end through the agent API (server on core 0)" >&2
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export SIGIL_ADMIN_SOCKET="$work/admin.sock"
"$S" ca init --trust-domain bench.sigil --data-dir "$work/ca" >/dev/null
$pin0 "$S" server run --data-dir "$work/ca" --listen "127.0.0.1:$port" --log-level warning 2>"$work/server.log" &
for _ in $(seq 100); do [ -S "$SIGIL_ADMIN_SOCKET" ] && break; sleep 0.1; done
[ -S "$SIGIL_ADMIN_SOCKET" ] || { echo "sigil server did not start: $(tail -3 "$work/server.log")" >&2; exit 1; }
"$S" agent run --server "127.0.0.1:$port" --join-token "$("$S" token create --agent-id node-1)" \
    --trust-bundle "$work/ca/bundle.pem" --socket "$work/agent.sock" --data-dir "$work/agent" \
    --log-level warning 2>"$work/agent.log" &
for _ in $(seq 150); do [ -S "$work/agent.sock" ] && [ -n "$(ls "$work/agent" 2>/dev/null)" ] && break; sleep 0.1; done
: > "$work/entries.txt"
for i in $(seq 200); do
    "$S" entry create --spiffe-id "spiffe://bench.sigil/ns/load/sa/w$i" --parent node-1 --selector "unix:uid:9$i" \
        --ttl 1h --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' >> "$work/entries.txt"
done
api="$($pinrest "$B" agent-sign --agent-dir "$work/agent" --server "127.0.0.1:$port" --entries "$work/entries.txt" \
    --bundle "$work/ca/bundle.pem" --rounds 50 --batch 50 --concurrency 4)"
echo "$api" >&2
lone="$($pinrest "$B" agent-sign --agent-dir "$work/agent" --server "127.0.0.1:$port" --entries "$work/entries.txt" \
    --bundle "$work/ca/bundle.pem" --rounds 2 --batch 1 --concurrency 1)"
echo "$lone" >&2
server_rss_kb="$(awk '$1 == "VmHWM:" {print $2}' /proc/$(jobs -p | head -1)/status 2>/dev/null || echo 0)"

echo "==> 4. bootstrapping a trust root (hyperfine)" >&2
cat > "$work/openssl-ca.sh" <<'SH'
set -e
d="$(mktemp -d)"; cd "$d"
cat > x.cnf <<'CNF'
[req]
distinguished_name = dn
[dn]
[root]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
subjectAltName = URI:spiffe://bench.sigil
[int]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = URI:spiffe://bench.sigil
CNF
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out root.key 2>/dev/null
openssl req -x509 -new -key root.key -subj "/O=bench.sigil/CN=root" -days 365 -config x.cnf -extensions root -out root.pem
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out int.key 2>/dev/null
openssl req -new -key int.key -subj "/O=bench.sigil/CN=intermediate" -config x.cnf -out int.csr
openssl x509 -req -in int.csr -CA root.pem -CAkey root.key -set_serial 1 -days 30 -extfile x.cnf -extensions int -out int.pem 2>/dev/null
cat root.pem > bundle.pem
cd /; rm -rf "$d"
SH
hyperfine -N --warmup 2 --runs 20 --export-json "$work/hyperfine.json" \
    -n "sigil ca init" "bash -c 'd=\$(mktemp -d); $S ca init --trust-domain bench.sigil --data-dir \$d/ca >/dev/null; rm -rf \$d'" \
    -n "openssl (5 commands)" "bash $work/openssl-ca.sh" >&2 || true

python3 - "$RESULT_JSON" "$ossl_sign" "$ossl_verify" "$server_rss_kb" "$work/hyperfine.json" <<PY
import json, os, sys
out, osign, overify, server_kb, hf = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4] or 0), sys.argv[5]
def kv(text):
    return {l.split()[0]: l.split()[1] for l in text.strip().splitlines() if len(l.split()) == 2}
inproc, api, lone = kv("""$inproc"""), kv("""$api"""), kv("""$lone""")
olimit = 1 / (1 / osign + 1 / overify)
slimit = float(inproc["limit_verify_plus_sign_per_s"])
rate_in = float(inproc["ca_end_to_end_per_s"]); rate_api = float(api["agent_api_svids_per_s"])
times = {}
if os.path.exists(hf):
    for r in json.load(open(hf))["results"]:
        times[r["command"]] = (r["median"], r["min"], r["max"])
print("| measure (same run) | per second | × openssl limit |")
print("|---|---:|---:|")
print(f"| limit: one P-256 verify + one sign, openssl speed, one core ({osign:,.0f} sign/s, {overify:,.0f} verify/s) | {olimit:,.0f} | 1.00 |")
print(f"| limit: the same with swift-crypto (sigil-bench) | {slimit:,.0f} | {slimit/olimit:.2f} |")
print(f"| Sigil CA in process, one core (CSR verify, sign, durable SQLite commit per batch of 64) | {rate_in:,.0f} | {rate_in/olimit:.2f} |")
print(f"| **Sigil end to end through the agent API** (server on one core, mTLS, batches of 50 × 4 lanes, durable commits) | **{rate_api:,.0f}** | **{rate_api/olimit:.2f}** |")
print()
print("| issuance latency | p50 | p99 |")
print("|---|---:|---:|")
print(f"| a batch of 50 with 4 batches in flight (every SVID in it) | {api['agent_api_issuance_p50_ms']} ms | {api['agent_api_issuance_p99_ms']} ms |")
print(f"| a lone SVID (batch of 1, nothing else in flight) | {lone['agent_api_issuance_p50_ms']} ms | {lone['agent_api_issuance_p99_ms']} ms |")
print(f"\nCA server peak RSS during the runs: {server_kb/1024:.1f} MB. Published anchor: Vault PKI ~2.2k stored certificates/s.")
if times:
    print()
    print("| bootstrapping a trust root (hyperfine, 20 runs) | median | min–max |")
    print("|---|---:|---:|")
    for name, (m, lo, hi) in times.items():
        print(f"| {name} | {m*1000:.1f} ms | {lo*1000:.1f}–{hi*1000:.1f} ms |")
goals = [{"goal": "CA end to end (agent API) ÷ the verify+sign limit (openssl, one core)", "text": f"×{rate_api/olimit:.2f} ({rate_api:,.0f}/s)",
          "target": "≥ 0.25", "met": rate_api / olimit >= 0.25}]
print("\n| goal | measured | target | met |\n|---|---:|---:|:---:|")
for g in goals:
    print(f"| {g['goal']} | {g['text']} | {g['target']} | {'yes' if g['met'] else 'NO'} |")
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump({"benchmark": "bench/ca.sh", "openssl": {"sign_per_s": osign, "verify_per_s": overify, "limit_per_s": olimit},
           "in_process": inproc, "agent_api": api, "agent_api_lone": lone, "server_peak_rss_kb": server_kb,
           "bootstrap_hyperfine_s": times, "goals": goals}, open(out, "w"), indent=1)
print(f"\nJSON: {out}")
PY
