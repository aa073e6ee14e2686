#!/usr/bin/env bash
# CA signing benchmark (not a test): SVIDs signed per second on one core from CSRs
# (parse + verify CSR + build and sign the SVID + store its row in SQLite, committed per batch),
# printed beside the limit measured in the same run: one ECDSA P-256 verify plus one sign,
# with swift-crypto and with `openssl speed ecdsap256`.
#
#   bash bench/sign.sh [count] [batch]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"
count="${1:-20000}"
batch="${2:-64}"
command -v openssl >/dev/null || bash scripts/install-deps.sh

echo "==> swift build -c release --product sigil-bench (first time: several minutes)" >&2
swift build -c release --product sigil-bench 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" >&2 || true
bin=".build/release/sigil-bench"

# One core for everything measured, so the figures compare.
pin="taskset -c 0"
command -v taskset >/dev/null || pin=""

echo "==> openssl speed ecdsap256 (one core)" >&2
ossl="$($pin openssl speed -seconds 3 ecdsap256 2>/dev/null | awk '/256 bits ecdsa \(nistp256\)/ {print $(NF-1), $NF}')"
ossl_sign="${ossl% *}"; ossl_verify="${ossl#* }"
ossl_limit="$(python3 -c "s=$ossl_sign; v=$ossl_verify; print(int(1/(1/s+1/v)))")"

echo "==> sigil-bench sign --count $count --batch $batch (one core)" >&2
out="$($pin "$bin" sign --count "$count" --batch "$batch" --seconds 3 --concurrency 4)"
one="$($pin "$bin" sign --count 2000 --batch 1 --seconds 1 --concurrency 1)"
get() { echo "$1" | awk -v k="$2" '$1 == k {print $2}'; }
limit="$(get "$out" limit_verify_plus_sign_per_s)"
rate="$(get "$out" ca_end_to_end_per_s)"
p99="$(get "$out" batch_p99_ms)"
rate1="$(get "$one" ca_end_to_end_per_s)"

python3 - "$limit" "$rate" "$ossl_sign" "$ossl_verify" "$ossl_limit" "$batch" "$p99" "$rate1" <<'PY'
import sys
limit, rate, osign, overify, olimit, batch, p99, rate1 = sys.argv[1:]
limit, rate, olimit, rate1 = int(limit), int(rate), int(olimit), int(rate1)
print("| measure (one core, same run) | per second | × swift-crypto limit |")
print("|---|---:|---:|")
print(f"| limit: one P-256 verify + one sign, swift-crypto | {limit:,} | 1.00 |")
print(f"| limit: one P-256 verify + one sign, openssl speed ({float(osign):,.0f} sign/s, {float(overify):,.0f} verify/s) | {olimit:,} | {olimit/limit:.2f} |")
print(f"| Sigil CA end to end, batches of {batch}, 4 in flight (parse + verify CSR, sign SVID, durable SQLite commit per batch) | {rate:,} | **{rate/limit:.2f}** |")
print(f"| Sigil CA end to end, batches of 1 (one SQLite commit per SVID) | {rate1:,} | {rate1/limit:.2f} |")
print(f"\nbatch of {batch}: p99 {p99} ms per batch")
PY
