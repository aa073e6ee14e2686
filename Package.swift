// swift-tools-version:6.1
import PackageDescription

let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("InternalImportsByDefault"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

// Products several targets use, named once.
let x509: Target.Dependency = .product(name: "X509", package: "swift-certificates")
let crypto: Target.Dependency = .product(name: "Crypto", package: "swift-crypto")
let asn1: Target.Dependency = .product(name: "SwiftASN1", package: "swift-asn1")
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")
let grpcCore: Target.Dependency = .product(name: "GRPCCore", package: "grpc-swift-2")
let grpcHTTP2: Target.Dependency = .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport")
let lifecycle: Target.Dependency = .product(name: "ServiceLifecycle", package: "swift-service-lifecycle")
let unixSignals: Target.Dependency = .product(name: "UnixSignals", package: "swift-service-lifecycle")

let package = Package(
    name: "sigil",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "sigil", targets: ["sigil"]),
        .executable(name: "sigil-proxy", targets: ["sigil-proxy"]),
        .library(name: "SigilCore", targets: ["SigilCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-certificates.git", exact: "1.21.1"),
        .package(url: "https://github.com/apple/swift-crypto.git", exact: "4.5.2"),
        .package(url: "https://github.com/apple/swift-asn1.git", exact: "1.7.4"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", exact: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", exact: "1.16.2"),
        .package(url: "https://github.com/groue/GRDB.swift.git", exact: "7.10.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-nio-extras.git", from: "1.35.2"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
        .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", exact: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", exact: "2.13.0"),
        .package(url: "https://github.com/jpsim/Yams.git", exact: "6.2.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", exact: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", exact: "2.4.1"),
    ],
    targets: [
        .target(
            name: "SigilCore",
            dependencies: [
                x509,
                crypto,
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                asn1,
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilStore",
            dependencies: [
                "SigilCore",
                .product(name: "GRDB", package: "GRDB.swift"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilCA",
            dependencies: [
                "SigilCore",
                "SigilStore",
                x509,
                crypto,
                .product(name: "_CryptoExtras", package: "swift-crypto"),
                asn1,
                logging,
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilRPC",
            dependencies: [
                "SigilCore",
                x509,
                asn1,
                grpcCore,
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                grpcHTTP2,
                lifecycle,
                logging,
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            exclude: ["Protos"],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilPolicy",
            dependencies: [
                "SigilCore",
                .product(name: "Yams", package: "Yams"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilTLS",
            dependencies: [
                "SigilCore",
                x509,
                crypto,
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCertificateReloading", package: "swift-nio-extras"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilServer",
            dependencies: [
                "SigilCore",
                "SigilCA",
                "SigilStore",
                "SigilRPC",
                "SigilTLS",
                grpcCore,
                grpcHTTP2,
                lifecycle,
                unixSignals,
                logging,
                x509,
                crypto,
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilAgent",
            dependencies: [
                "SigilCore",
                "SigilRPC",
                "SigilTLS",
                grpcCore,
                grpcHTTP2,
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                x509,
                crypto,
                asn1,
                lifecycle,
                unixSignals,
                logging,
            ],
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilProxy",
            dependencies: [
                "SigilCore",
                "SigilTLS",
                "SigilPolicy",
                "SigilRPC",
                x509,
                crypto,
                logging,
                lifecycle,
                unixSignals,
                grpcCore,
                grpcHTTP2,
                .product(name: "Yams", package: "Yams"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "sigil",
            dependencies: [
                "SigilCore",
                "SigilCA",
                "SigilStore",
                "SigilRPC",
                "SigilServer",
                "SigilAgent",
                "SigilPolicy",
                "SigilProxy",
                unixSignals,
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                logging,
                lifecycle,
                grpcCore,
                grpcHTTP2,
                .product(name: "Yams", package: "Yams"),
                x509,
                asn1,
            ],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "sigil-proxy",
            dependencies: ["SigilProxy", "SigilRPC", logging],
            swiftSettings: swiftSettings
        ),
        .executableTarget(
            name: "sigil-bench",
            dependencies: [
                "SigilCore",
                "SigilCA",
                "SigilStore",
                "SigilRPC",
                "SigilTLS",
                x509,
                crypto,
                asn1,
                grpcCore,
                grpcHTTP2,
            ],
            path: "bench/SigilBench",
            swiftSettings: swiftSettings
        ),
        .target(
            name: "SigilTestSupport",
            dependencies: [
                "SigilCore",
                "SigilCA",
                x509,
                crypto,
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilCoreTests",
            dependencies: ["SigilCore", "SigilTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilStoreTests",
            dependencies: ["SigilStore", "SigilCore", "SigilTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilAgentTests",
            dependencies: ["SigilAgent", "SigilRPC", "SigilTestSupport"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilPolicyTests",
            dependencies: ["SigilPolicy", "SigilCore"],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilProxyTests",
            dependencies: ["SigilProxy", "SigilCore", "SigilTestSupport", x509, asn1, logging, crypto, .product(name: "NIOCore", package: "swift-nio"),
                           .product(name: "NIOPosix", package: "swift-nio"),
                           .product(name: "NIOEmbedded", package: "swift-nio"),
                           .product(name: "NIOHTTP1", package: "swift-nio"),
                           .product(name: "NIOHPACK", package: "swift-nio-http2")],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilTLSTests",
            dependencies: [
                "SigilTLS", "SigilCore", "SigilTestSupport", x509,
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilServerTests",
            dependencies: ["SigilServer", "SigilStore", "SigilCore", logging],
            swiftSettings: swiftSettings
        ),
        .testTarget(
            name: "SigilCATests",
            dependencies: ["SigilCA", "SigilStore", "SigilTestSupport"],
            swiftSettings: swiftSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
