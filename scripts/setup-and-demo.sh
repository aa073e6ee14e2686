#!/usr/bin/env bash
# Fresh Debian machine → dependencies installed, sigil built, the demo run: a CA server, a node
# agent, two services behind mTLS proxies, an allowed and a denied call, and the ledger rows.
# On a terminal the system stays up until Ctrl-C; otherwise it stops after the calls.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="/opt/swift/usr/bin:$PATH"
echo "==> swift build"
swift build --product sigil 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" || true
test -x .build/debug/sigil || { echo "error: build failed"; exit 1; }
exec .build/debug/sigil demo "$@"
