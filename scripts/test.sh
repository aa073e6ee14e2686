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

# The release build bench/run.sh makes (whole-module mode catches import errors a debug build
# does not: MemberImportVisibility broke it once while every test passed). It takes ~8 minutes
# from scratch on 2 vCPUs; SIGIL_RELEASE_CHECK=auto (the default) skips it, saying so, when the
# run has already taken 21 minutes, to keep CI near 30; =always or =never decide outright.
release_check="${SIGIL_RELEASE_CHECK:-auto}"
case "$release_check" in
always|never|auto) ;;
*) echo "error: SIGIL_RELEASE_CHECK must be always, never or auto, not '$release_check'"; exit 2 ;;
esac
if [ "$release_check" = never ] || { [ "$release_check" = auto ] && [ "$SECONDS" -gt 1260 ]; }; then
    echo "==> release build skipped (SIGIL_RELEASE_CHECK=$release_check, ${SECONDS}s so far); bench/run.sh builds it"
    exit 0
fi
echo "==> swift build -c release (what bench/run.sh builds; ${SECONDS}s so far)"
if ! swift build -c release --static-swift-stdlib -Xlinker --gc-sections >/tmp/sigil-release-build.log 2>&1; then
    if grep -q "error:" /tmp/sigil-release-build.log; then grep "error:" /tmp/sigil-release-build.log | head -20; else tail -20 /tmp/sigil-release-build.log; fi
    echo "error: the release build failed (whole log: /tmp/sigil-release-build.log)"; exit 1
fi
tail -1 /tmp/sigil-release-build.log
