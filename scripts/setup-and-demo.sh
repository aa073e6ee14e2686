#!/usr/bin/env bash
# Fresh Debian machine → dependencies installed, sigil built, the demo run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="/opt/swift/usr/bin:$PATH"
echo "==> swift build"
swift build --product sigil 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" || true
bash scripts/demo.sh
