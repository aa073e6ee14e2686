#!/usr/bin/env bash
# Regenerates the committed protobuf and grpc-swift-2 code of the SigilRPC target:
#   Sources/SigilRPC/Protos/*.proto  ->  Sources/SigilRPC/Generated/*.pb.swift, *.grpc.swift
# The protoc plugins are built (debug; output is byte-identical to release) from the versions
# pinned in tools/protoc-plugins/Package.swift, which must match the versions Package.swift
# uses at runtime. protoc is Debian's protobuf-compiler (installed if missing). Output is
# deterministic: running this twice leaves the working tree unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PROTO_DIR=Sources/SigilRPC/Protos
OUT_DIR=Sources/SigilRPC/Generated
PLUGINS_PKG=tools/protoc-plugins

if ! command -v swift >/dev/null 2>&1; then
    for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
        [ -x "$d/swift" ] && export PATH="$d:$PATH" && break
    done
fi

if ! command -v protoc >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "==> apt-get install protobuf-compiler"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        protobuf-compiler >/dev/null
fi
echo "==> $(protoc --version)"

echo "==> building protoc plugins (debug) in $PLUGINS_PKG"
for product in protoc-gen-swift protoc-gen-grpc-swift-2; do
    swift build --package-path "$PLUGINS_PKG" --product "$product" 2>&1 \
        | grep -Ev "^\[[0-9]+/[0-9]+\]" || true
done
BIN_DIR="$(swift build --package-path "$PLUGINS_PKG" --show-bin-path)"
for product in protoc-gen-swift protoc-gen-grpc-swift-2; do
    [ -x "$BIN_DIR/$product" ] || { echo "error: $BIN_DIR/$product was not built" >&2; exit 1; }
done

# google/protobuf/struct.proto (a well-known type) is imported from swift-protobuf's own copy,
# the one SwiftProtobuf.Google_Protobuf_Struct is generated from, so no Swift code is generated
# for it here. Debian's protobuf-compiler does not ship the .proto files (libprotobuf-dev does):
# those are only a fallback.
WKT_DIR=""
for d in "$PLUGINS_PKG/.build/checkouts/swift-protobuf/Protos/Sources/SwiftProtobuf" \
         /usr/include /usr/local/include; do
    if [ -f "$d/google/protobuf/struct.proto" ]; then WKT_DIR="$d"; break; fi
done
[ -n "$WKT_DIR" ] || { echo "error: google/protobuf/struct.proto not found" >&2; exit 1; }

mapfile -t protos < <(cd "$PROTO_DIR" && find . -maxdepth 1 -name '*.proto' -printf '%f\n' | LC_ALL=C sort)
((${#protos[@]})) || { echo "error: no .proto files in $PROTO_DIR" >&2; exit 1; }

echo "==> protoc ${protos[*]} -> $OUT_DIR"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.pb.swift "$OUT_DIR"/*.grpc.swift
protoc \
    --plugin=protoc-gen-swift="$BIN_DIR/protoc-gen-swift" \
    --plugin=protoc-gen-grpc-swift-2="$BIN_DIR/protoc-gen-grpc-swift-2" \
    -I "$PROTO_DIR" -I "$WKT_DIR" \
    --swift_out="$OUT_DIR" \
    --swift_opt=Visibility=Public,FileNaming=DropPath,UseAccessLevelOnImports=true \
    --grpc-swift-2_out="$OUT_DIR" \
    --grpc-swift-2_opt=Visibility=Public,Client=true,Server=true,FileNaming=DropPath,UseAccessLevelOnImports=true \
    "${protos[@]}"

ls -1 "$OUT_DIR"
