public import X509
public import SigilCore
import Crypto
public import Foundation

/// A throwaway PKI for tests: a root and an intermediate for a trust domain, built in memory.
public struct TestPKI: Sendable {
    public let trustDomain: TrustDomain
    public let root: SigningAuthority
    public let intermediate: SigningAuthority

    public init(trustDomain: String = "example.org", now: Date = Date(), caTTL: Duration = .seconds(86_400)) throws {
        let td = try TrustDomain(trustDomain)
        let rootKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let rootCert = try CAProfile(trustDomain: td, ttl: .seconds(10 * 86_400), commonName: "Test Root", maxPathLength: 1).makeRoot(key: rootKey, now: now)
        let root = try SigningAuthority(certificate: rootCert, privateKey: rootKey)
        let intKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let intCert = try CAProfile(trustDomain: td, ttl: caTTL, commonName: "Test Intermediate", maxPathLength: 0)
            .makeIntermediate(publicKey: intKey.publicKey, issuer: root, now: now)
        self.trustDomain = td
        self.root = root
        self.intermediate = try SigningAuthority(certificate: intCert, privateKey: intKey)
    }

    /// A fresh P-256 key pair.
    public static func p256() -> Certificate.PrivateKey {
        Certificate.PrivateKey(P256.Signing.PrivateKey())
    }
}

/// A temporary directory removed when the value is dropped via ``remove()``.
public struct TemporaryDirectory: Sendable {
    public let path: String
    public init(prefix: String = "sigil-test") throws {
        let base = FileManager.default.temporaryDirectory.path + "/\(prefix)-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        self.path = base
    }
    public func remove() {
        try? FileManager.default.removeItem(atPath: path)
    }
}
