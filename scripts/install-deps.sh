#!/usr/bin/env bash
# Installs every system package and Python test dependency Sigil's build, demo and tests use.
# Safe to run again: it skips what is already there. Needs root (or sudo) for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium and a font: the ledger page's test renders it headless and checks the screenshot.
packages=(libsqlite3-dev libssl-dev openssl curl python3 python3-pip chromium fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "==> apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python test dependencies (interop tests drive real outside clients).
# Every module the interop tests import is checked, so a machine with only some of them installed
# still gets the rest.
if ! python3 -c "import pytest, cryptography, spiffe, grpc, grpc_tools, PIL" 2>/dev/null || [ -n "${SIGIL_PIP_ALWAYS:-}" ]; then
    echo "==> pip install -r Tests/Interop/requirements.txt"
    python3 -m pip install -q -r Tests/Interop/requirements.txt 2>/dev/null \
        || python3 -m pip install -q --break-system-packages -r Tests/Interop/requirements.txt
fi

if ! command -v swift >/dev/null 2>&1; then
    for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
        [ -x "$d/swift" ] && export PATH="$d:$PATH" && break
    done
fi
command -v swift >/dev/null 2>&1 || { echo "error: Swift 6 toolchain not found (expected swift on PATH or in /opt/swift)"; exit 2; }
