// swift-tools-version:6.1
// Pins the protoc plugins used by scripts/gen-proto.sh. Nothing here ships in Sigil:
// `swift build --package-path tools/protoc-plugins --product protoc-gen-swift` and
// `--product protoc-gen-grpc-swift-2` build the plugins from the pinned dependencies.
import PackageDescription

let package = Package(
    name: "protoc-plugins",
    dependencies: [
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
    ],
    targets: []
)
