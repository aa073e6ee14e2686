public import Crypto
import _CryptoExtras
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// A public key that can verify JWT-SVIDs: ECDSA on P-256, P-384 or P-521, or RSA of 2048 bits or more.
///
/// Sigil signs with P-256 only (``JWTSigningKey``); the other kinds are accepted so that bundles of
/// federated trust domains (SPIRE can sign with RSA or P-384) can be read and their tokens validated.
public struct JWTPublicKey: Sendable, Hashable, CustomStringConvertible {
    enum Backing: Sendable {
        case p256(P256.Signing.PublicKey)
        case p384(P384.Signing.PublicKey)
        case p521(P521.Signing.PublicKey)
        case rsa(_RSA.Signing.PublicKey)
    }

    let backing: Backing
    /// SubjectPublicKeyInfo DER: what equality and hashing compare.
    let der: [UInt8]

    public init(_ key: P256.Signing.PublicKey) {
        backing = .p256(key)
        der = Array(key.derRepresentation)
    }

    public init(_ key: P384.Signing.PublicKey) {
        backing = .p384(key)
        der = Array(key.derRepresentation)
    }

    public init(_ key: P521.Signing.PublicKey) {
        backing = .p521(key)
        der = Array(key.derRepresentation)
    }

    init(rsa key: _RSA.Signing.PublicKey) {
        backing = .rsa(key)
        der = Array(key.derRepresentation)
    }

    /// Reads a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block holding a P-256, P-384, P-521 or RSA key.
    public init(pemRepresentation pem: String) throws(SigilError) {
        if let key = try? P256.Signing.PublicKey(pemRepresentation: pem) {
            self.init(key)
        } else if let key = try? P384.Signing.PublicKey(pemRepresentation: pem) {
            self.init(key)
        } else if let key = try? P521.Signing.PublicKey(pemRepresentation: pem) {
            self.init(key)
        } else if let key = try? _RSA.Signing.PublicKey(unsafePEMRepresentation: pem) {
            guard key.keySizeInBits >= 2048 else {
                throw SigilError(.weakKey, "RSA key of \(key.keySizeInBits) bits is too weak to verify JWT-SVIDs; at least 2048 bits are required")
            }
            self.init(rsa: key)
        } else {
            throw SigilError(.unsupportedKey, "PEM is not a P-256, P-384, P-521 or RSA public key")
        }
    }

    /// The DER SubjectPublicKeyInfo of the key.
    public var derRepresentation: [UInt8] { der }

    /// The JWS `alg` values (RFC 7518) this key can verify.
    public var algorithms: [String] {
        switch backing {
        case .p256: ["ES256"]
        case .p384: ["ES384"]
        case .p521: ["ES512"]
        case .rsa: ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
        }
    }

    public var description: String {
        switch backing {
        case .p256: "EC P-256"
        case .p384: "EC P-384"
        case .p521: "EC P-521"
        case .rsa(let key): "RSA \(key.keySizeInBits)"
        }
    }

    public static func == (lhs: JWTPublicKey, rhs: JWTPublicKey) -> Bool { lhs.der == rhs.der }
    public func hash(into hasher: inout Hasher) { hasher.combine(der) }

    /// The JWK of this key for a SPIFFE bundle (`use: jwt-svid`).
    func jwk(keyID: String) -> JWK {
        switch backing {
        case .p256(let key):
            return ecJWK(curve: "P-256", raw: Array(key.rawRepresentation), keyID: keyID)
        case .p384(let key):
            return ecJWK(curve: "P-384", raw: Array(key.rawRepresentation), keyID: keyID)
        case .p521(let key):
            return ecJWK(curve: "P-521", raw: Array(key.rawRepresentation), keyID: keyID)
        case .rsa(let key):
            var jwk = JWK(kty: "RSA", use: JWTBundle.jwtSVIDUse)
            jwk.kid = keyID
            if let primitives = try? key.getKeyPrimitives() {
                jwk.n = base64URL(primitives.modulus.drop { $0 == 0 })
                jwk.e = base64URL(primitives.publicExponent.drop { $0 == 0 })
            }
            return jwk
        }
    }

    private func ecJWK(curve: String, raw: [UInt8], keyID: String) -> JWK {
        var jwk = JWK(kty: "EC", use: JWTBundle.jwtSVIDUse)
        jwk.kid = keyID
        jwk.crv = curve
        jwk.x = base64URL(raw.prefix(raw.count / 2))
        jwk.y = base64URL(raw.suffix(raw.count / 2))
        return jwk
    }
}

/// The JWT authorities of one trust domain: the public keys, by key ID (`kid`), that JWT-SVIDs of
/// `trustDomain` are verified with. During a key rotation it holds the old and new keys together.
///
/// Serialized as a JWK Set per the SPIFFE Trust Domain and Bundle spec: each key has `use: jwt-svid`
/// and its `kid`. Reading a full SPIFFE bundle keeps only its `jwt-svid` keys.
public struct JWTBundle: Sendable, Hashable {
    /// The `use` value of JWT-SVID keys in a SPIFFE bundle.
    public static let jwtSVIDUse = "jwt-svid"
    /// The longest key ID Sigil accepts.
    public static let maximumKeyIDLength = 256

    public let trustDomain: TrustDomain
    /// The verification keys by key ID.
    public private(set) var authorities: [String: JWTPublicKey]

    /// An empty bundle.
    public init(trustDomain: TrustDomain) {
        self.trustDomain = trustDomain
        self.authorities = [:]
    }

    /// A bundle of the given keys (each key ID checked as by ``add(keyID:publicKey:)``).
    public init(trustDomain: TrustDomain, authorities: [String: JWTPublicKey]) throws(SigilError) {
        self.init(trustDomain: trustDomain)
        for (keyID, key) in authorities.sorted(by: { $0.key < $1.key }) {
            try add(keyID: keyID, publicKey: key)
        }
    }

    /// Adds a key. Adding the same key under the same ID again is a no-op; a different key under an
    /// ID already present is refused (a key ID must name exactly one key).
    public mutating func add(keyID: String, publicKey: JWTPublicKey) throws(SigilError) {
        try JWTBundle.validate(keyID: keyID, code: .invalidArgument)
        if let existing = authorities[keyID], existing != publicKey {
            throw SigilError(.invalidBundle, "JWT bundle of \(trustDomain) already has a different key with kid '\(keyID)'; a key ID must name exactly one key")
        }
        authorities[keyID] = publicKey
    }

    /// Adds the public half of a signing key under its key ID.
    public mutating func add(_ key: JWTSigningKey) throws(SigilError) {
        try add(keyID: key.keyID, publicKey: JWTPublicKey(key.publicKey))
    }

    /// Removes the key with `keyID`; returns whether it was there.
    @discardableResult
    public mutating func remove(keyID: String) -> Bool {
        authorities.removeValue(forKey: keyID) != nil
    }

    /// The key with `keyID`, if the bundle has it.
    public func publicKey(forKeyID keyID: String) -> JWTPublicKey? { authorities[keyID] }

    /// The JWK elements of the bundle (`use: jwt-svid`), sorted by key ID.
    var jwkElements: [JWK] {
        authorities.sorted { $0.key < $1.key }.map { $0.value.jwk(keyID: $0.key) }
    }

    /// The JWK Set of the bundle: `{"keys":[{"crv":"P-256","kid":...,"kty":"EC","use":"jwt-svid","x":...,"y":...}]}`,
    /// keys of every object sorted, elements sorted by key ID, one line, UTF-8.
    public func jwksJSON() -> [UInt8] {
        let document = SpiffeBundleDocument(keys: jwkElements, spiffe_sequence: nil, spiffe_refresh_hint: nil)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding plain strings cannot fail.
        return Array((try? encoder.encode(document)) ?? Data())
    }

    /// Reads a JWK Set or a full SPIFFE bundle. Only keys with `use: jwt-svid` are kept; keys for other
    /// uses (such as `x509-svid`), keys without `use`, and keys of unknown type or curve are ignored, as
    /// the bundle spec requires. A `jwt-svid` key without `kid`, with malformed parameters, or reusing
    /// another key's `kid` is refused.
    public init(jwksJSON json: [UInt8], trustDomain: TrustDomain) throws(SigilError) {
        let document: JWKSetDocument
        do {
            document = try JSONDecoder().decode(JWKSetDocument.self, from: Data(json))
        } catch {
            throw SigilError(.invalidBundle, "JWT bundle for \(trustDomain) is not a valid JWK Set (a JSON object with a 'keys' array): \(error)")
        }
        self.init(trustDomain: trustDomain)
        for (index, element) in document.keys.enumerated() {
            guard let jwk = element.jwk else {
                throw SigilError(.invalidBundle, "key \(index) of the JWT bundle for \(trustDomain) is not a JWK object with string parameters (and a 'kty')")
            }
            guard jwk.use == JWTBundle.jwtSVIDUse else { continue }
            guard let keyID = jwk.kid, !keyID.isEmpty else {
                throw SigilError(.invalidBundle, "key \(index) of the JWT bundle for \(trustDomain) has use jwt-svid but no 'kid'; JWT-SVID keys must have a key ID")
            }
            do throws(SigilError) {
                try JWTBundle.validate(keyID: keyID, code: .invalidBundle)
            } catch {
                throw SigilError(.invalidBundle, "key \(index) of the JWT bundle for \(trustDomain): \(error.message)")
            }
            guard let key = try JWTBundle.publicKey(of: jwk, index: index, keyID: keyID) else { continue }
            try add(keyID: keyID, publicKey: key)
        }
    }

    /// Reads a JWK Set or a full SPIFFE bundle given as a string.
    public init(jwksJSON json: String, trustDomain: TrustDomain) throws(SigilError) {
        try self.init(jwksJSON: Array(json.utf8), trustDomain: trustDomain)
    }

    static func validate(keyID: String, code: SigilError.Code) throws(SigilError) {
        if keyID.isEmpty {
            throw SigilError(code, "JWT key ID is empty")
        }
        if keyID.utf8.count > maximumKeyIDLength {
            throw SigilError(code, "JWT key ID is \(keyID.utf8.count) bytes long; at most \(maximumKeyIDLength) are allowed")
        }
        if keyID.utf8.contains(where: { $0 < 0x21 || $0 > 0x7E }) {
            throw SigilError(code, "JWT key ID '\(keyID)' has a character outside printable ASCII (or a space)")
        }
    }

    /// The key of a `jwt-svid` JWK; nil for a key type or curve this implementation does not know.
    private static func publicKey(of jwk: JWK, index: Int, keyID: String) throws(SigilError) -> JWTPublicKey? {
        let what = "key \(index) (kid '\(keyID)') of the JWT bundle"
        switch jwk.kty {
        case "EC":
            let size: Int
            switch jwk.crv {
            case "P-256": size = 32
            case "P-384": size = 48
            case "P-521": size = 66
            default: return nil
            }
            guard let xText = jwk.x, let yText = jwk.y,
                  let x = base64URLDecodedStrict(xText), let y = base64URLDecodedStrict(yText) else {
                throw SigilError(.invalidBundle, "\(what) has missing or malformed 'x'/'y' (base64url without padding is required)")
            }
            guard x.count == size, y.count == size else {
                throw SigilError(.invalidBundle, "\(what) has coordinates of \(x.count) and \(y.count) bytes; \(jwk.crv ?? "") needs exactly \(size) each")
            }
            let x963 = [0x04] + x + y
            do {
                switch size {
                case 32: return JWTPublicKey(try P256.Signing.PublicKey(x963Representation: x963))
                case 48: return JWTPublicKey(try P384.Signing.PublicKey(x963Representation: x963))
                default: return JWTPublicKey(try P521.Signing.PublicKey(x963Representation: x963))
                }
            } catch {
                throw SigilError(.invalidBundle, "\(what) is not a point on \(jwk.crv ?? "its curve")")
            }
        case "RSA":
            guard let nText = jwk.n, let eText = jwk.e,
                  let n = base64URLDecodedStrict(nText), let e = base64URLDecodedStrict(eText) else {
                throw SigilError(.invalidBundle, "\(what) has missing or malformed 'n'/'e' (base64url without padding is required)")
            }
            let bits = n.drop { $0 == 0 }.count * 8
            guard bits >= 2048 else {
                throw SigilError(.weakKey, "\(what) is an RSA key of about \(bits) bits; at least 2048 are required")
            }
            do {
                return JWTPublicKey(rsa: try _RSA.Signing.PublicKey(n: n, e: e))
            } catch {
                throw SigilError(.invalidBundle, "\(what) is not a valid RSA public key")
            }
        default:
            return nil
        }
    }
}


/// Decodes base64url without padding (RFC 7515 section 2) strictly: only the URL-safe alphabet, no
/// `=`, no line breaks, and no stray bits in the last character, so that every byte string has exactly
/// one encoding. Returns nil for anything else.
func base64URLDecodedStrict<S: StringProtocol>(_ text: S) -> [UInt8]? {
    let utf8 = text.utf8
    if utf8.count % 4 == 1 { return nil }
    var out: [UInt8] = []
    out.reserveCapacity(utf8.count * 3 / 4)
    var buffer: UInt32 = 0
    var bits = 0
    for byte in utf8 {
        let value: UInt32
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"): value = UInt32(byte - UInt8(ascii: "A"))
        case UInt8(ascii: "a")...UInt8(ascii: "z"): value = UInt32(byte - UInt8(ascii: "a")) + 26
        case UInt8(ascii: "0")...UInt8(ascii: "9"): value = UInt32(byte - UInt8(ascii: "0")) + 52
        case UInt8(ascii: "-"): value = 62
        case UInt8(ascii: "_"): value = 63
        default: return nil
        }
        buffer = (buffer << 6) | value
        bits += 6
        if bits >= 8 {
            bits -= 8
            out.append(UInt8(truncatingIfNeeded: buffer >> UInt32(bits)))
            buffer &= (1 << UInt32(bits)) - 1
        }
    }
    // Leftover bits (2 or 4) must be zero in the canonical encoding.
    return buffer == 0 ? out : nil
}
