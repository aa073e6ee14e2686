public import X509
import Crypto
import SwiftASN1
import _CryptoExtras
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The CA certificates a peer of `trustDomain` must trust. During a CA rotation it holds the old and
/// new roots together. Serialized as PEM or as a SPIFFE bundle (a JWK Set per the SPIFFE Trust Domain
/// and Bundle spec: one key per CA, `use: x509-svid`, `x5c` of exactly one certificate, no `kid`).
public struct TrustBundle: Sendable, Hashable {
    public let trustDomain: TrustDomain
    /// The CA certificates, without duplicates, in the order they were added.
    public private(set) var authorities: [Certificate]
    /// `spiffe_sequence`: increases with every change of the bundle.
    public var sequenceNumber: UInt64
    /// `spiffe_refresh_hint`: how often a consumer should check for a new bundle.
    public var refreshHint: Duration?

    public init(trustDomain: TrustDomain, authorities: [Certificate], sequenceNumber: UInt64 = 0, refreshHint: Duration? = nil) throws(SigilError) {
        self.trustDomain = trustDomain
        self.authorities = []
        self.sequenceNumber = sequenceNumber
        self.refreshHint = refreshHint
        for certificate in authorities { try add(certificate) }
    }

    /// Adds a CA certificate (a no-op if it is already present).
    public mutating func add(_ certificate: Certificate) throws(SigilError) {
        guard certificate.isCertificateAuthority else {
            throw SigilError(.invalidBundle, "certificate '\(certificate.subject)' is not a CA (basicConstraints cA is not true); a trust bundle holds CA certificates only")
        }
        if !authorities.contains(certificate) { authorities.append(certificate) }
    }

    /// Removes a CA certificate; returns whether it was there.
    @discardableResult
    public mutating func remove(_ certificate: Certificate) -> Bool {
        guard let index = authorities.firstIndex(of: certificate) else { return false }
        authorities.remove(at: index)
        return true
    }

    /// All CA certificates as concatenated PEM blocks.
    public var pemEncoded: String { authorities.map(\.pemString).joined() }

    /// The SPIFFE bundle document (JSON, keys sorted, one line).
    public func spiffeBundleJSON(prettyPrinted: Bool = false, jwtBundle: JWTBundle? = nil) -> String {
        let document = SpiffeBundleDocument(
            keys: authorities.map(JWK.init(x509Authority:)) + (jwtBundle?.jwkElements ?? []),
            spiffe_sequence: sequenceNumber,
            spiffe_refresh_hint: refreshHint.map { $0.components.seconds })
        let encoder = JSONEncoder()
        encoder.outputFormatting = prettyPrinted ? [.sortedKeys, .prettyPrinted, .withoutEscapingSlashes] : [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain strings and integers cannot fail.
        let data = (try? encoder.encode(document)) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }

    /// Reads a SPIFFE bundle document. Keys with `use: x509-svid` become authorities. As the SPIFFE
    /// specs require, an element of an unknown key type or use (such as `jwt-svid`), or one that
    /// is not a JWK at all, is ignored; an `x509-svid` key without `x5c` is ignored and of several
    /// `x5c` certificates only the first counts. A key whose `x5c` is not a CA certificate, or whose
    /// parameters contradict that certificate's public key, is refused.
    public init(spiffeBundleJSON json: String, trustDomain: TrustDomain) throws(SigilError) {
        let document: JWKSetDocument
        let members: SpiffeBundleMembers
        do {
            document = try JSONDecoder().decode(JWKSetDocument.self, from: Data(json.utf8))
            members = try JSONDecoder().decode(SpiffeBundleMembers.self, from: Data(json.utf8))
        } catch {
            throw SigilError(.invalidBundle, "SPIFFE bundle for \(trustDomain) is not a valid JWK Set: \(error)")
        }
        var certificates: [Certificate] = []
        for (index, element) in document.keys.enumerated() {
            guard let key = element.jwk, key.use == "x509-svid", ["EC", "RSA"].contains(key.kty),
                  let first = key.x5c?.first else { continue }
            guard let der = Data(base64Encoded: first) else {
                throw SigilError(.invalidBundle, "key \(index) of the SPIFFE bundle has x5c that is not base64")
            }
            let certificate: Certificate
            do {
                certificate = try Certificate(derEncoded: Array(der))
            } catch {
                throw SigilError(.invalidBundle, "key \(index) of the SPIFFE bundle has an x5c that is not an X.509 certificate: \(error)")
            }
            let stated = JWK(x509Authority: certificate)
            // A key of a curve this reader cannot express (P-521) keeps its certificate, which is
            // what is trusted; any other key must agree with it.
            guard stated.kty == "unknown" || stated.sameKey(as: key) else {
                throw SigilError(.invalidBundle, "key \(index) of the SPIFFE bundle: its key parameters do not match the public key of its x5c certificate")
            }
            certificates.append(certificate)
        }
        guard !certificates.isEmpty else {
            throw SigilError(.invalidBundle, "the SPIFFE bundle for \(trustDomain) has no usable x509-svid key (one with kty EC or RSA and an x5c certificate)")
        }
        try self.init(
            trustDomain: trustDomain, authorities: certificates,
            sequenceNumber: members.spiffe_sequence ?? 0,
            refreshHint: members.spiffe_refresh_hint.map { .seconds($0) })
    }

    /// Reads concatenated PEM CA certificates.
    public init(pem: String, trustDomain: TrustDomain) throws(SigilError) {
        try self.init(trustDomain: trustDomain, authorities: Certificate.parseChain(pem: pem, what: "trust bundle"))
    }
}

struct SpiffeBundleDocument: Codable {
    var keys: [JWK]
    var spiffe_sequence: UInt64?
    var spiffe_refresh_hint: Int64?
}

/// A JWK Set (or SPIFFE bundle) as read: elements are decoded one by one, and one that does not
/// decode as a JWK is kept as nil, for the reader to ignore (SPIFFE bundles) or report by index
/// (JWT bundles).
struct JWKSetDocument: Decodable {
    struct Element: Decodable {
        var jwk: JWK?
        init(from decoder: any Decoder) throws {
            jwk = try? JWK(from: decoder)
        }
    }
    var keys: [Element]
}

/// A SPIFFE bundle's own members, read beside its ``JWKSetDocument`` (a JWT bundle reader ignores them).
private struct SpiffeBundleMembers: Decodable {
    var spiffe_sequence: UInt64?
    var spiffe_refresh_hint: Int64?
}

/// One JSON Web Key of a SPIFFE bundle.
struct JWK: Codable, Equatable {
    var kty: String
    var use: String?
    var kid: String?
    var crv: String?
    var x: String?
    var y: String?
    var n: String?
    var e: String?
    var x5c: [String]?

    init(kty: String, use: String?) {
        self.kty = kty
        self.use = use
    }

    /// The JWK of a CA certificate for X509-SVID validation.
    init(x509Authority certificate: Certificate) {
        let key = certificate.publicKey
        if let p256 = P256.Signing.PublicKey(key) {
            self.init(kty: "EC", use: "x509-svid")
            crv = "P-256"
            let raw = p256.rawRepresentation
            x = base64URL(raw.prefix(32))
            y = base64URL(raw.suffix(32))
        } else if let p384 = P384.Signing.PublicKey(key) {
            self.init(kty: "EC", use: "x509-svid")
            crv = "P-384"
            let raw = p384.rawRepresentation
            x = base64URL(raw.prefix(48))
            y = base64URL(raw.suffix(48))
        } else if let rsa = _RSA.Signing.PublicKey(key), let primitives = try? rsa.getKeyPrimitives() {
            self.init(kty: "RSA", use: "x509-svid")
            n = base64URL(primitives.modulus)
            e = base64URL(primitives.publicExponent)
        } else {
            self.init(kty: "unknown", use: "x509-svid")
        }
        x5c = [Data(certificate.derBytes).base64EncodedString()]
    }

    func sameKey(as other: JWK) -> Bool {
        kty == other.kty && crv == other.crv && x == other.x && y == other.y && n == other.n && e == other.e
    }
}

/// base64url without padding (RFC 7515 section 2).
func base64URL<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
    var out = ""
    for ch in Data(bytes).base64EncodedString() {
        switch ch {
        case "+": out.append("-")
        case "/": out.append("_")
        case "=": continue
        default: out.append(ch)
        }
    }
    return out
}
