import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
public import NIOCore
import NIOPosix
import SigilCore
import SwiftASN1
public import X509

/// Why the identity source refused a request; the Workload API maps these to gRPC status codes.
public struct WorkloadAPIError: Error, Sendable, Hashable {
    public enum Code: Sendable, Hashable {
        /// The caller matches no entry, or asked for an ID it is not entitled to.
        case permissionDenied
        /// The request is malformed (no audience, bad token).
        case invalidArgument
        /// The agent has nothing to serve yet (not attested, server never reached).
        case unavailable
    }
    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
}

/// One X509-SVID as received from a Workload API, decoded and checked.
public struct FetchedX509SVID: Sendable {
    public let spiffeID: String
    /// Leaf first, then intermediates, as the agent sent them.
    public let certificates: [Certificate]
    /// The SVID's private key (its public key is the leaf's).
    public let privateKey: Certificate.PrivateKey
    /// The key as received: PKCS#8 DER.
    public let privateKeyPKCS8DER: [UInt8]
    /// The trust bundle of the SVID's trust domain (root certificates).
    public let bundle: [Certificate]
    public let hint: String
}

/// One `FetchX509SVID` response: the caller's SVIDs and the bundles of federated trust domains.
public struct FetchedX509Context: Sendable {
    public let svids: [FetchedX509SVID]
    /// Keyed as the agent keyed them (`spiffe://<td>`).
    public let federatedBundles: [String: [Certificate]]
}

/// A client of the SPIFFE Workload API (`sigil svid fetch`, `sigil svid watch`, the proxy), over the
/// agent's Unix socket. Sends the `workload.spiffe.io: true` header the spec requires.
///
/// Errors are ``WorkloadAPIError``s whose message names the socket and the gRPC status, e.g.
/// `the Workload API at /run/sigil/agent.sock refused: PermissionDenied: no identity issued`.
public struct WorkloadAPIClient: Sendable {
    /// The event loops the client's connection runs on (nil: NIO's shared singleton group). A
    /// proxy passes its own, so the Workload API stream costs it no extra threads.
    let eventLoopGroup: (any EventLoopGroup)?

    public init(eventLoopGroup: (any EventLoopGroup)? = nil) {
        self.eventLoopGroup = eventLoopGroup
    }

    /// The socket path of a Workload API endpoint address: `unix:///path`, `unix:/path` or a bare `/path`
    /// (the forms of `SPIFFE_ENDPOINT_SOCKET`). A `unix:` address has nothing but its path (no host,
    /// query or fragment: the Workload Endpoint standard, §4); `tcp://` endpoints are not served.
    public static func socketPath(fromEndpoint endpoint: String) throws(WorkloadAPIError) -> String {
        func refuse(_ why: String) -> WorkloadAPIError {
            WorkloadAPIError(.invalidArgument, "Workload API endpoint '\(endpoint)' \(why); use unix:///path/to/agent.sock or an absolute path")
        }
        // A URI scheme is case-insensitive (RFC 3986, 3.1): UNIX:///path is unix:///path.
        let scheme = endpoint.prefix { $0 != ":" && $0 != "/" }.lowercased()
        let hasScheme = endpoint.dropFirst(scheme.count).hasPrefix(":")
        if hasScheme, scheme == "tcp" {
            throw refuse("is a TCP address, and the Sigil agent serves the Workload API only on a Unix socket")
        }
        guard hasScheme, scheme == "unix" else {
            if hasScheme, !scheme.isEmpty { throw refuse("has the scheme '\(scheme):', not unix:") }
            guard endpoint.hasPrefix("/") else { throw refuse("is neither a unix: address nor an absolute path") }
            return endpoint
        }
        var path = endpoint.dropFirst("unix:".count)
        if path.hasPrefix("//") {
            path = path.dropFirst(2)
            guard path.hasPrefix("/") else { throw refuse("names a host; a unix: address has only a path") }
        }
        guard !path.isEmpty else { throw refuse("has no path") }
        guard path.hasPrefix("/") else { throw refuse("has a relative path") }
        guard !path.contains("?"), !path.contains("#") else { throw refuse("has a query or fragment") }
        return String(path)
    }

    /// The socket path of a `--socket` option: a plain path as given (relative or not), or an
    /// endpoint address (`unix:`, `tcp:`) read by ``socketPath(fromEndpoint:)``.
    public static func socketPath(fromOption value: String) throws(WorkloadAPIError) -> String {
        let lowered = value.prefix(5).lowercased()
        // An address with a scheme (`http://x`) is an endpoint address too, refused for its scheme.
        let scheme = value.prefix { $0.isLetter || $0.isNumber || "+.-".contains($0) }
        let hasURIScheme = !scheme.isEmpty && value.dropFirst(scheme.count).hasPrefix("://")
        guard lowered.hasPrefix("unix:") || lowered.hasPrefix("tcp:") || hasURIScheme else { return value }
        return try socketPath(fromEndpoint: value)
    }

    /// Fetches the caller's current X509-SVIDs once.
    public func fetchX509(socketPath: String) async throws -> FetchedX509Context {
        try await call(socketPath: socketPath) { api in
            try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: Self.securityMetadata, options: Self.fetchOptions) { response in
                for try await message in response.messages {
                    return try Self.decode(message, socketPath: socketPath)
                }
                throw WorkloadAPIError(.unavailable, "the Workload API at \(socketPath) closed the stream without sending an X509-SVID")
            }
        }
    }

    /// Streams the caller's X509-SVIDs: `onUpdate` runs with the first response and again after every
    /// rotation. Returns when the agent ends the stream normally; throws its status otherwise, or what
    /// `onUpdate` throws. Cancel the task to stop watching.
    public func watchX509(
        socketPath: String,
        onUpdate: @escaping @Sendable (FetchedX509Context) async throws -> Void
    ) async throws {
        try await call(socketPath: socketPath) { api in
            try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: Self.securityMetadata, options: Self.watchOptions) { response in
                for try await message in response.messages {
                    try await onUpdate(try Self.decode(message, socketPath: socketPath))
                }
            }
        }
    }

    // MARK: Internals

    static let securityMetadata: Metadata = ["workload.spiffe.io": "true"]

    static var watchOptions: CallOptions {
        var options = CallOptions.defaults
        options.waitForReady = false
        return options
    }

    static var fetchOptions: CallOptions {
        var options = CallOptions.defaults
        options.timeout = .seconds(30)
        options.waitForReady = false
        return options
    }

    private func call<R: Sendable>(
        socketPath: String,
        _ body: @Sendable (SPIFFESpiffeWorkloadAPI.Client<HTTP2ClientTransport.Posix>) async throws -> R
    ) async throws -> R {
        guard FileManager.default.fileExists(atPath: socketPath) else {
            throw WorkloadAPIError(.unavailable, "no Workload API socket at \(socketPath): is the Sigil agent running? (set --socket or SPIFFE_ENDPOINT_SOCKET)")
        }
        do {
            let transport = try HTTP2ClientTransport.Posix(
                target: .unixDomainSocket(path: socketPath),
                transportSecurity: .plaintext,
                eventLoopGroup: eventLoopGroup ?? .singletonMultiThreadedEventLoopGroup
            )
            return try await withGRPCClient(transport: transport) { client in
                try await body(SPIFFESpiffeWorkloadAPI.Client(wrapping: client))
            }
        } catch let error as WorkloadAPIError {
            throw error
        } catch let error as RPCError {
            throw Self.clientError(error, socketPath: socketPath)
        } catch let error as any RPCErrorConvertible {
            throw Self.clientError(RPCError(error), socketPath: socketPath)
        }
    }

    static func clientError(_ error: RPCError, socketPath: String) -> WorkloadAPIError {
        let status = "\(statusName(error.code)): \(error.message)"
        switch error.code {
        case .permissionDenied:
            return WorkloadAPIError(.permissionDenied, "the Workload API at \(socketPath) refused: \(status) (no registration entry matches this process's selectors, e.g. unix:uid:\(getuid()))")
        case .invalidArgument:
            return WorkloadAPIError(.invalidArgument, "the Workload API at \(socketPath) rejected the request: \(status)")
        case .unavailable:
            return WorkloadAPIError(.unavailable, "the Workload API at \(socketPath) is unavailable: \(status) (is the Sigil agent running and attested?)")
        case .deadlineExceeded:
            return WorkloadAPIError(.unavailable, "the Workload API at \(socketPath) did not answer in time: \(status)")
        default:
            return WorkloadAPIError(.unavailable, "the Workload API at \(socketPath) failed: \(status)")
        }
    }

    /// The status code's name as gRPC spells it (`PermissionDenied`).
    static func statusName(_ code: RPCError.Code) -> String {
        let raw = "\(code)"
        guard let first = raw.first else { return raw }
        return first.uppercased() + raw.dropFirst()
    }

    static func decode(_ response: SPIFFEX509SVIDResponse, socketPath: String) throws(WorkloadAPIError) -> FetchedX509Context {
        func malformed(_ what: String) -> WorkloadAPIError {
            WorkloadAPIError(.unavailable, "the Workload API at \(socketPath) sent a malformed X509-SVID response: \(what)")
        }
        guard !response.svids.isEmpty else {
            throw malformed("it holds no SVID")
        }
        var svids: [FetchedX509SVID] = []
        for svid in response.svids {
            let certificates: [Certificate]
            let bundle: [Certificate]
            do {
                certificates = try DERCertificates.parse(Array(svid.x509Svid))
                bundle = try DERCertificates.parse(Array(svid.bundle))
            } catch {
                throw malformed("\(svid.spiffeID): \(error.message)")
            }
            guard let leaf = certificates.first, !bundle.isEmpty else {
                throw malformed("\(svid.spiffeID): empty certificate chain or bundle")
            }
            guard leaf.spiffeID?.description == svid.spiffeID else {
                throw malformed("the leaf certificate's URI SAN (\(leaf.uriSANs.joined(separator: ", "))) is not \(svid.spiffeID)")
            }
            let keyDER = Array(svid.x509SvidKey)
            let key: Certificate.PrivateKey
            do {
                key = try Certificate.PrivateKey(derBytes: keyDER)
            } catch {
                throw malformed("\(svid.spiffeID): the private key is not PKCS#8 DER (\(error))")
            }
            guard key.publicKey == leaf.publicKey else {
                throw malformed("\(svid.spiffeID): the private key does not belong to the leaf certificate")
            }
            svids.append(FetchedX509SVID(
                spiffeID: svid.spiffeID,
                certificates: certificates,
                privateKey: key,
                privateKeyPKCS8DER: keyDER,
                bundle: bundle,
                hint: svid.hint
            ))
        }
        var federated: [String: [Certificate]] = [:]
        for (trustDomain, der) in response.federatedBundles {
            do {
                federated[trustDomain] = try DERCertificates.parse(Array(der))
            } catch {
                throw malformed("federated bundle \(trustDomain): \(error.message)")
            }
        }
        return FetchedX509Context(svids: svids, federatedBundles: federated)
    }
}

/// Splits concatenated DER certificates (the Workload API's `x509_svid` and `bundle` fields).
enum DERCertificates {
    static func parse(_ bytes: [UInt8]) throws(WorkloadAPIError) -> [Certificate] {
        var certificates: [Certificate] = []
        var offset = 0
        while offset < bytes.count {
            // Each certificate is one DER SEQUENCE: tag 0x30, then a definite length.
            guard bytes[offset] == 0x30, offset + 1 < bytes.count else {
                throw WorkloadAPIError(.unavailable, "certificate \(certificates.count + 1) does not start with a DER SEQUENCE")
            }
            var length = 0
            var header = 2
            let first = Int(bytes[offset + 1])
            if first < 0x80 {
                length = first
            } else {
                let count = first & 0x7F
                guard count >= 1, count <= 4, offset + 1 + count < bytes.count else {
                    throw WorkloadAPIError(.unavailable, "certificate \(certificates.count + 1) has an invalid DER length")
                }
                for index in 0..<count {
                    length = length << 8 | Int(bytes[offset + 2 + index])
                }
                header += count
            }
            let end = offset + header + length
            guard end <= bytes.count else {
                throw WorkloadAPIError(.unavailable, "certificate \(certificates.count + 1) is truncated")
            }
            do {
                certificates.append(try Certificate(derEncoded: Array(bytes[offset..<end])))
            } catch {
                throw WorkloadAPIError(.unavailable, "certificate \(certificates.count + 1) is not a valid X.509 certificate: \(error)")
            }
            offset = end
        }
        return certificates
    }
}
