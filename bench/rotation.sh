#!/usr/bin/env bash
# Identity delivery benchmarks (not tests), all on loopback with release builds:
#   1. rotation fan-out: 1,000 open FetchX509SVID streams (50 connections), one entry with a 20 s TTL;
#      when the agent rotates the SVID, how long until every stream has the new one;
#   2. entry change -> workload: time from `sigil entry create` returning to the workload's first
#      successful fetch of the new identity;
#   3. a CA root rotation's new bundle reaching every stream: 1,000 streams open, `sigil ca rotate
#      --root` on the server's data directory; from the command's return to the last stream holding
#      the bundle with both roots, and the spread between the first and last stream.
# (SVIDs signed per second through the agent API moved to bench/ca.sh.)
#
#   bash bench/rotation.sh      (or bash bench/run.sh rotation)
# Prints a markdown table; writes bench/results/rotation-<UTC date>.json (figures + goals).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
bench_install_peers
bench_build
RESULT_JSON="${RESULT_JSON:-$PWD/bench/results/rotation-$(date -u +%Y-%m-%d).json}"
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
    got=0
    for _ in $(seq 3000); do   # bounded: 3000 one-shot fetches (~30 s and more) and it counts as missed
        if "$S" svid fetch --socket "$work/agent.sock" --json 2>/dev/null | grep -q "change$i"; then got=1; break; fi
    done
    t2=$(date +%s%N)
    if ((got)); then changes+=("$(( (t2 - t1) / 1000000 ))"); else changes+=(99999); fi
done
echo "entry_change_ms ${changes[*]}" >&2

echo "==> 3. CA root rotation: new bundle to 1000 streams" >&2
"$B" fanout --socket "$work/agent.sock" --streams 1000 --connections 50 --timeout 60 --watch bundle >"$work/bundle-fan.txt" 2>"$work/bundle-fan.err" &
fanpid=$!
for _ in $(seq 600); do grep -q fanout_ready "$work/bundle-fan.err" 2>/dev/null && break; sleep 0.1; done
"$S" ca rotate --root --data-dir "$work/ca" >/dev/null
t_rotate=$(date +%s.%N)
wait "$fanpid" || true
bfan="$(cat "$work/bundle-fan.txt")"
echo "$bfan" >&2
bundle_e2e_ms="$(python3 -c "import sys; print('%.0f' % ((float(sys.argv[1]) - float(sys.argv[2])) * 1000))"     "$(echo "$bfan" | awk '$1 == "fanout_last_unix" {print $2}')" "$t_rotate" 2>/dev/null || echo 99999)"

get() { echo "$1" | awk -v k="$2" '$1 == k {print $2}'; }
echo
echo "| measure (one run, loopback, release builds) | value |"
echo "|---|---:|"
echo "| streams open / rotated | $(get "$fan" fanout_streams_ready) / $(get "$fan" fanout_streams_rotated) |"
echo "| rotation reaches all 1,000 streams: last − first arrival | $(get "$fan" fanout_spread_ms) ms |"
echo "| … p50 / p99 arrival after the first | $(get "$fan" fanout_p50_ms) / $(get "$fan" fanout_p99_ms) ms |"
echo "| entry created → workload fetches it (5 tries) | ${changes[*]} ms |"
echo "| CA root rotation: streams with the new bundle | $(get "$bfan" fanout_streams_rotated) / 1000 |"
echo "| … \`sigil ca rotate --root\` returns → last stream has it | ${bundle_e2e_ms} ms |"
echo "| … first → last stream (the fan-out itself) | $(get "$bfan" fanout_spread_ms) ms |"
spread="$(get "$fan" fanout_spread_ms)"
worst_change="$(printf '%s\n' "${changes[@]}" | sort -n | tail -1)"
rotated="$(get "$fan" fanout_streams_rotated)"
met() { python3 -c "import sys; print('yes' if $1 else 'NO')"; }
{
    printf 'rotation reaches 1,000 streams (last − first arrival)\t%s ms (%s rotated)\t< 100 ms\t%s\n' "$spread" "$rotated" \
        "$(met "${rotated:-0} == 1000 and ${spread:-1e9} < 100")"
    printf 'entry change reaches the workload (worst of 5)\t%s ms\t≤ 1000 ms\t%s\n' "$worst_change" "$(met "${worst_change:-1e9} <= 1000")"
    bspread="$(get "$bfan" fanout_spread_ms)"; brot="$(get "$bfan" fanout_streams_rotated)"
    printf "CA rotation's new bundle reaches every stream (first → last)\t%s ms (%s streams; %s ms from the command)\t< 100 ms\t%s\n" \
        "$bspread" "$brot" "$bundle_e2e_ms" "$(met "${brot:-0} == 1000 and ${bspread:-1e9} < 100")"
} > "$work/goals.tsv"
echo
echo "| goal | measured | target | met |"
echo "|---|---:|---:|:---:|"
awk -F'\t' '{print "| " $1 " | " $2 " | " $3 " | " $4 " |"}' "$work/goals.tsv"
mkdir -p "$(dirname "$RESULT_JSON")"
bench_goals_json "$RESULT_JSON" bench/rotation.sh < "$work/goals.tsv"
echo
echo "JSON: $RESULT_JSON"
