#!/usr/bin/env bash
# Identity delivery benchmarks (not tests), all on loopback with release builds:
#   1. rotation fan-out: 1,000 open FetchX509SVID streams (50 connections), one entry with a 20 s TTL;
#      when the agent rotates the SVID, how long until every stream has the new one;
#   2. entry change -> workload: time from `sigil entry create` returning to the workload's first
#      successful fetch of the new identity;
#   3. SVIDs signed per second through the agent API (mTLS, batches of 100, durable SQLite commits).
#
#   bash bench/rotation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
echo "==> release builds (first time: several minutes)" >&2
swift build -c release --product sigil 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" >&2 || true
swift build -c release --product sigil-bench 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" >&2 || true
S="$PWD/.build/release/sigil"
B="$PWD/.build/release/sigil-bench"
work="$(mktemp -d /tmp/sigil-bench-rot.XXXXXX)"
port=$((20000 + RANDOM % 20000))
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
export SIGIL_ADMIN_SOCKET="$work/admin.sock"

"$S" ca init --trust-domain bench.sigil --data-dir "$work/ca" >/dev/null
"$S" server run --data-dir "$work/ca" --listen "127.0.0.1:$port" --log-level warning 2>"$work/server.log" &
for _ in $(seq 100); do [ -S "$SIGIL_ADMIN_SOCKET" ] && break; sleep 0.1; done
"$S" entry create --spiffe-id spiffe://bench.sigil/ns/bench/sa/fanout --parent node-1 --selector "unix:uid:$(id -u)" --ttl 20s >/dev/null
"$S" agent run --server "127.0.0.1:$port" --join-token "$("$S" token create --agent-id node-1)" --trust-bundle "$work/ca/bundle.pem" \
    --socket "$work/agent.sock" --data-dir "$work/agent" --log-level warning 2>"$work/agent.log" &
for _ in $(seq 100); do "$S" svid fetch --socket "$work/agent.sock" >/dev/null 2>&1 && break; sleep 0.1; done

echo "==> 1. rotation fan-out to 1000 streams" >&2
fan="$("$B" fanout --socket "$work/agent.sock" --streams 1000 --connections 50 --timeout 60)"
echo "$fan" >&2

echo "==> 2. entry change -> workload" >&2
changes=()
for i in 1 2 3 4 5; do
    id="spiffe://bench.sigil/ns/bench/sa/change$i"
    t0=$(date +%s%N)
    "$S" entry create --spiffe-id "$id" --parent node-1 --selector "unix:uid:$(id -u)" --selector "unix:gid:$(id -g)" --ttl 1h >/dev/null
    t1=$(date +%s%N)
    until "$S" svid fetch --socket "$work/agent.sock" --json 2>/dev/null | grep -q "change$i"; do :; done
    t2=$(date +%s%N)
    changes+=("$(( (t2 - t1) / 1000000 ))")
done
echo "entry_change_ms ${changes[*]}" >&2

echo "==> 3. agent API signing throughput" >&2
: > "$work/entries.txt"
for i in $(seq 200); do
    "$S" entry create --spiffe-id "spiffe://bench.sigil/ns/load/sa/w$i" --parent node-1 --selector "unix:uid:9$i" --ttl 1h --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' >> "$work/entries.txt"
done
sign="$("$B" agent-sign --agent-dir "$work/agent" --server "127.0.0.1:$port" --entries "$work/entries.txt" --bundle "$work/ca/bundle.pem" --rounds 10 --batch 100)"
echo "$sign" >&2

get() { echo "$1" | awk -v k="$2" '$1 == k {print $2}'; }
echo
echo "| measure (one run, loopback, release builds) | value |"
echo "|---|---:|"
echo "| streams open / rotated | $(get "$fan" fanout_streams_ready) / $(get "$fan" fanout_streams_rotated) |"
echo "| rotation reaches all 1,000 streams: last − first arrival | $(get "$fan" fanout_spread_ms) ms |"
echo "| … p50 / p99 arrival after the first | $(get "$fan" fanout_p50_ms) / $(get "$fan" fanout_p99_ms) ms |"
echo "| entry created → workload fetches it (5 tries) | ${changes[*]} ms |"
echo "| SVIDs signed through the agent API (mTLS, batches of 100) | $(get "$sign" agent_api_svids_per_s) /s |"
