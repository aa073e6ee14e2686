public import NIOCertificateReloading
public import NIOSSL
import NIOConcurrencyHelpers
import SigilCore

/// The current X509-SVID (chain + key) of a process, as NIOSSL's certificate reloader: every new
/// handshake reads the newest one; open connections keep theirs. ``update(chainDER:keyPKCS8DER:)``
/// swaps it in (rotation without a restart).
public final class SVIDCertificateReloader: CertificateReloader, Sendable {
    private let state: NIOLockedValueBox<NIOSSLContextConfigurationOverride>

    public init(chainDER: [[UInt8]], keyPKCS8DER: [UInt8]) throws {
        state = NIOLockedValueBox(try Self.makeOverride(chainDER: chainDER, keyPKCS8DER: keyPKCS8DER))
    }

    public var sslContextConfigurationOverride: NIOSSLContextConfigurationOverride {
        state.withLockedValue { $0 }
    }

    /// Serves a new SVID to the next handshakes.
    public func update(chainDER: [[UInt8]], keyPKCS8DER: [UInt8]) throws {
        let next = try Self.makeOverride(chainDER: chainDER, keyPKCS8DER: keyPKCS8DER)
        state.withLockedValue { $0 = next }
    }

    static func makeOverride(chainDER: [[UInt8]], keyPKCS8DER: [UInt8]) throws -> NIOSSLContextConfigurationOverride {
        var o = NIOSSLContextConfigurationOverride()
        o.certificateChain = try chainDER.map { .certificate(try NIOSSLCertificate(bytes: $0, format: .der)) }
        o.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: keyPKCS8DER, format: .der))
        return o
    }
}
