#!/usr/bin/env bash
# One entry point for the benchmarks (not tests):
#
#   bash bench/run.sh [proxy|ca|rotation|all]      (default: all)
#
# Installs the peers from Debian packages (nginx, wrk, h2load, hyperfine, matplotlib), builds the
# release binaries once, runs the chosen benchmarks in this one run on this machine, and prints
# every table plus one table of the goals (ratios against the peers measured in the same run).
# Each benchmark's output is kept in bench/results/<name>-<UTC date>.md beside its JSON; the proxy
# benchmark also redraws docs/bench-latency.png. Settings pass through the environment (for example
# ROUNDS=5 DURATION=15 for bench/proxy.sh; see each script's header).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
source bench/lib.sh

what="${1:-all}"
case "$what" in
all) benches=(ca rotation proxy) ;;
proxy|ca|rotation) benches=("$what") ;;
-h|--help) sed -n 2,11p "$0"; exit 0 ;;
*) echo "usage: bash bench/run.sh [proxy|ca|rotation|all] (got '$what')" >&2; exit 2 ;;
esac

bench_install_peers
bench_build
day="$(date -u +%Y-%m-%d)"
mkdir -p bench/results
failed=()
for b in "${benches[@]}"; do
    echo "==> bench/$b.sh" >&2
    # bench/proxy.sh run alone keeps a partial run's figures out of bench/results; this entry point
    # always keeps them there (the goal table below reads them). PLOT is read by proxy.sh only.
    if RESULT_JSON="$PWD/bench/results/$b-$day.json" PLOT="$PWD/docs/bench-latency.png" \
        bash "bench/$b.sh" | tee "bench/results/$b-$day.md"; then :; else failed+=("$b"); fi
done

python3 - "$day" "${benches[@]}" <<'PY'
import json, os, sys
day, names = sys.argv[1], sys.argv[2:]
rows = []
for n in names:
    path = f"bench/results/{n}-{day}.json"
    if not os.path.exists(path):
        rows.append((n, "no results (the benchmark failed; see its output)", "", "", None))
        continue
    for g in json.load(open(path)).get("goals", []):
        rows.append((n, g["goal"], g.get("text", ""), g.get("target", ""), g.get("met")))
print("\n## Goals, this run\n")
print("| bench | goal | measured | target | met |")
print("|---|---|---:|---:|:---:|")
for n, g, v, t, m in rows:
    print(f"| {n} | {g} | {v} | {t} | {'–' if m is None else ('yes' if m else 'NO')} |")
met = sum(1 for r in rows if r[4] is True)
missed = sum(1 for r in rows if r[4] is False)
print(f"\n{met} goals met, {missed} missed, {len(rows) - met - missed} not measured")
PY
if ((${#failed[@]})); then echo "failed: ${failed[*]}" >&2; exit 1; fi
