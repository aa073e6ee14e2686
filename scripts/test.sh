#!/usr/bin/env bash
# The whole test suite: Swift unit tests, then interop tests that drive the real `sigil` binary
# with outside clients (openssl, Python cryptography). One debug build serves both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="/opt/swift/usr/bin:$PATH"

echo "==> swift build (debug, with tests)"
swift build --build-tests 2>&1 | grep -Ev "^\[[0-9]+/[0-9]+\]" || true
test -x .build/debug/sigil || { echo "error: build failed"; exit 1; }

echo "==> swift test"
swift test --skip-build 2>&1 | tee /tmp/sigil-swift-test.log \
    | awk '/^(◇|↳)/ { next } /^✔ (Suite|Test) / && !/^✔ Test run with/ { next } { print }' || true
grep -q "Test run with .* passed" /tmp/sigil-swift-test.log || { echo "error: swift tests failed"; exit 1; }

echo "==> interop tests (pytest)"
SIGIL_BIN="$PWD/.build/debug/sigil" python3 -m pytest -q Tests/Interop
