public import Crypto
import _CryptoExtras
#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

// JWT-SVIDs per the SPIFFE JWT-SVID spec: JWS Compact Serialization, header `alg`/`kid`/`typ` only,
// claims `sub` (the SPIFFE ID), `aud` (one or more) and `exp` (required), plus `iat`.

/// A key that signs JWT-SVIDs: an ECDSA P-256 private key (JWS `ES256`) and its key ID (`kid`), which
/// is how validators find the matching public key in the trust domain's ``JWTBundle``.
public struct JWTSigningKey: Sendable {
    /// The key ID written into every token's header and into the bundle.
    public let keyID: String
    public let privateKey: P256.Signing.PrivateKey

    /// Wraps an existing key. The key ID must be 1 to 256 bytes of printable ASCII without spaces.
    public init(privateKey: P256.Signing.PrivateKey, keyID: String) throws(SigilError) {
        try JWTBundle.validate(keyID: keyID, code: .invalidArgument)
        self.privateKey = privateKey
        self.keyID = keyID
    }

    /// A new random P-256 key with a random key ID (``randomKeyID()``).
    public init() {
        self.privateKey = P256.Signing.PrivateKey()
        self.keyID = JWTSigningKey.randomKeyID()
    }

    public var publicKey: P256.Signing.PublicKey { privateKey.publicKey }

    /// 128 random bits as 32 lowercase hex characters.
    public static func randomKeyID() -> String {
        randomHex(byteCount: 16)
    }
}

/// Mints JWT-SVIDs signed with ES256.
///
/// Header `{"alg":"ES256","kid":<key ID>,"typ":"JWT"}`; claims `{"aud":[...],"exp":<int>,"iat":<int>,"sub":<SPIFFE ID>}`
/// (`aud` always an array, which every SPIFFE library accepts); signature the 64-byte `r || s`; all
/// three parts base64url without padding.
public struct JWTSVIDSigner: Sendable {
    public init() {}

    /// Signs a JWT-SVID for `spiffeID`, valid from `now` (rounded down to the second) for `ttl`.
    public func sign(spiffeID: SpiffeID, audience: [String], ttl: Duration, now: Date, key: JWTSigningKey) throws(SigilError) -> String {
        if spiffeID.isTrustDomainID {
            throw SigilError(.invalidArgument, "cannot sign a JWT-SVID for \(spiffeID): it is the ID of the trust domain itself, not of a workload")
        }
        if audience.isEmpty {
            throw SigilError(.invalidArgument, "a JWT-SVID needs at least one audience (the spec requires 'aud'); name the service it is for")
        }
        if audience.contains(where: \.isEmpty) {
            throw SigilError(.invalidArgument, "JWT-SVID audience \(audience) contains an empty string")
        }
        let issuedAt = now.timeIntervalSince1970.rounded(.down)
        let expiry = (now.timeIntervalSince1970 + ttl.timeInterval).rounded(.down)
        guard ttl > .zero, expiry > issuedAt else {
            throw SigilError(.invalidArgument, "JWT-SVID lifetime \(DurationText.format(ttl)) is too short; it must be at least 1s")
        }
        guard issuedAt >= 0, expiry < 253_402_300_800 else {  // 9999-12-31T23:59:59Z
            throw SigilError(.invalidArgument, "JWT-SVID times are out of range (now \(now), lifetime \(DurationText.format(ttl)))")
        }
        let header = Header(alg: "ES256", kid: key.keyID, typ: "JWT")
        let claims = Claims(sub: spiffeID.description, aud: audience, exp: Int64(expiry), iat: Int64(issuedAt))
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let signingInput: String
        do {
            signingInput = base64URL(try encoder.encode(header)) + "." + base64URL(try encoder.encode(claims))
        } catch {
            throw SigilError(.invalidArgument, "cannot encode JWT-SVID: \(error)")
        }
        let signature: P256.Signing.ECDSASignature
        do {
            signature = try key.privateKey.signature(for: Array(signingInput.utf8))
        } catch {
            throw SigilError(.invalidArgument, "cannot sign JWT-SVID with key '\(key.keyID)': \(error)")
        }
        return signingInput + "." + base64URL(signature.rawRepresentation)
    }

    private struct Header: Encodable {
        var alg: String
        var kid: String
        var typ: String
    }

    private struct Claims: Encodable {
        var sub: String
        var aud: [String]
        var exp: Int64
        var iat: Int64
    }
}

/// Validates JWT-SVIDs against the JWT bundle of one trust domain.
///
/// Checks, in order: the token is three base64url parts; the header is a JSON object whose `alg` is one
/// of the spec's asymmetric algorithms (never `none`, never HMAC), with no `crit`, `typ` absent or
/// `JWT`/`JOSE`, and a `kid` present in the bundle whose key suits `alg`; the signature; then the
/// claims: `sub` a SPIFFE ID of the bundle's trust domain, `aud` present and containing the expected
/// audience, `exp` present and after `now`, and `nbf`/`iat` (when present) not in the future.
public struct JWTSVIDValidator: Sendable {
    /// The `alg` values of the JWT-SVID spec, section 2.1. Everything else is rejected.
    public static let supportedAlgorithms: Set<String> = [
        "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    ]
    /// The largest token accepted, in bytes.
    public static let maximumTokenLength = 64 * 1024

    /// How long after `exp` a token is still accepted. Zero by default: the spec says expired tokens
    /// MUST be rejected, and Sigil's clocks are expected to be in sync.
    public var expiryLeeway: Duration
    /// How far in the future `nbf` and `iat` may be, to absorb small clock differences between the
    /// issuer and this validator.
    public var futureLeeway: Duration

    public init(expiryLeeway: Duration = .zero, futureLeeway: Duration = .seconds(30)) {
        self.expiryLeeway = expiryLeeway
        self.futureLeeway = futureLeeway
    }

    /// Validates `token` for `audience` at `now`. Returns the SPIFFE ID of its subject and the claims
    /// (the decoded payload, a JSON object) exactly as received. Every rejection is a `.invalidJWT`
    /// error whose message names the problem.
    public func validate(token: String, audience: String, bundle: JWTBundle, now: Date) throws(SigilError) -> (spiffeID: SpiffeID, claimsJSON: [UInt8]) {
        if audience.isEmpty {
            throw SigilError(.invalidArgument, "the expected audience is empty; a validator must name the audience it accepts")
        }
        let bytes = token.utf8
        if bytes.isEmpty {
            throw SigilError(.invalidJWT, "JWT-SVID is empty")
        }
        if bytes.count > JWTSVIDValidator.maximumTokenLength {
            throw SigilError(.invalidJWT, "JWT-SVID is \(bytes.count) bytes long; at most \(JWTSVIDValidator.maximumTokenLength) are accepted")
        }
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            throw SigilError(.invalidJWT, "JWT-SVID has \(parts.count) dot-separated parts; the JWS Compact Serialization has exactly 3 (header.payload.signature)")
        }
        guard let headerBytes = base64URLDecodedStrict(parts[0]) else {
            throw SigilError(.invalidJWT, "JWT-SVID header is not base64url without padding")
        }
        guard let payload = base64URLDecodedStrict(parts[1]) else {
            throw SigilError(.invalidJWT, "JWT-SVID payload is not base64url without padding")
        }
        guard let signature = base64URLDecodedStrict(parts[2]) else {
            throw SigilError(.invalidJWT, "JWT-SVID signature is not base64url without padding")
        }

        // Header.
        let header: JOSEHeader = try decodeObject(headerBytes, what: "header")
        guard let alg = header.alg else {
            throw SigilError(.invalidJWT, "JWT-SVID header has no 'alg'")
        }
        guard JWTSVIDValidator.supportedAlgorithms.contains(alg) else {
            if alg.lowercased() == "none" {
                throw SigilError(.invalidJWT, "JWT-SVID has alg '\(alg)' (an unsigned token); unsigned tokens are never accepted")
            }
            throw SigilError(.invalidJWT, "JWT-SVID has alg '\(alg)', which the JWT-SVID spec does not allow; accepted: \(JWTSVIDValidator.supportedAlgorithms.sorted().joined(separator: ", "))")
        }
        if header.hasCrit {
            throw SigilError(.invalidJWT, "JWT-SVID header has 'crit'; no critical JWS extensions are understood, so the token is rejected")
        }
        if let typ = header.typ, typ != "JWT", typ != "JOSE" {
            throw SigilError(.invalidJWT, "JWT-SVID header has typ '\(typ)'; the spec allows only 'JWT' or 'JOSE'")
        }
        guard let keyID = header.kid, !keyID.isEmpty else {
            throw SigilError(.invalidJWT, "JWT-SVID header has no 'kid'; it is needed to find the signing key in the bundle")
        }
        guard let key = bundle.publicKey(forKeyID: keyID) else {
            throw SigilError(.invalidJWT, "unknown kid '\(keyID)': the JWT bundle of \(bundle.trustDomain) has no such key (it has \(bundle.authorities.keys.sorted()))")
        }

        // Signature, over the ASCII of "header.payload" as received.
        let signingInput = Array(token.utf8.prefix(parts[0].utf8.count + 1 + parts[1].utf8.count))
        try JWTSVIDValidator.verify(alg: alg, key: key, keyID: keyID, signingInput: signingInput, signature: signature)

        // Claims, only now that they are known to come from the key's holder.
        let claims: JWTClaims = try decodeObject(payload, what: "payload")
        guard let subject = claims.sub else {
            throw SigilError(.invalidJWT, "JWT-SVID has no 'sub' claim; it must be the SPIFFE ID of the workload")
        }
        let spiffeID: SpiffeID
        do {
            spiffeID = try SpiffeID(subject)
        } catch {
            throw SigilError(.invalidJWT, "JWT-SVID subject '\(subject)' is not a SPIFFE ID: \(error.message)")
        }
        guard spiffeID.isMember(of: bundle.trustDomain) else {
            throw SigilError(.invalidJWT, "JWT-SVID subject \(spiffeID) is in trust domain \(spiffeID.trustDomain), but the bundle it was checked against is of \(bundle.trustDomain)")
        }
        guard let audiences = claims.aud else {
            throw SigilError(.invalidJWT, "JWT-SVID has no 'aud' claim; the spec requires one")
        }
        if audiences.isEmpty {
            throw SigilError(.invalidJWT, "JWT-SVID 'aud' claim is an empty array; the spec requires at least one audience")
        }
        guard audiences.contains(audience) else {
            throw SigilError(.invalidJWT, "audience '\(audience)' not in token audiences [\(audiences.map { "'\($0)'" }.joined(separator: ", "))]")
        }
        guard let expiry = claims.exp else {
            throw SigilError(.invalidJWT, "JWT-SVID has no 'exp' claim; the spec requires an expiry")
        }
        let nowSeconds = now.timeIntervalSince1970
        if nowSeconds >= expiry + expiryLeeway.timeInterval {
            throw SigilError(.invalidJWT, "JWT-SVID has expired at \(JWTSVIDValidator.format(expiry)) (exp \(JWTSVIDValidator.integer(expiry))); it is now \(JWTSVIDValidator.format(nowSeconds))")
        }
        for (name, value) in [("nbf", claims.nbf), ("iat", claims.iat)] {
            if let value, value > nowSeconds + futureLeeway.timeInterval {
                let meaning = name == "nbf" ? "not valid before" : "issued at"
                throw SigilError(.invalidJWT, "JWT-SVID is \(meaning) \(JWTSVIDValidator.format(value)) (\(name) \(JWTSVIDValidator.integer(value))), which is in the future; it is now \(JWTSVIDValidator.format(nowSeconds))")
            }
        }
        return (spiffeID, payload)
    }

    private func decodeObject<T: Decodable>(_ bytes: [UInt8], what: String) throws(SigilError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch let error as SigilError {
            throw error
        } catch {
            throw SigilError(.invalidJWT, "JWT-SVID \(what) is not a JSON object")
        }
    }

    static func verify(alg: String, key: JWTPublicKey, keyID: String, signingInput: [UInt8], signature: [UInt8]) throws(SigilError) {
        func requireLength(_ length: Int) throws(SigilError) {
            guard signature.count == length else {
                throw SigilError(.invalidJWT, "JWT-SVID \(alg) signature is \(signature.count) bytes; JWS uses the \(length)-byte r||s form (not DER)")
            }
        }
        let valid: Bool
        switch (alg, key.backing) {
        case ("ES256", .p256(let key)):
            try requireLength(64)
            guard let sig = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { valid = false; break }
            valid = key.isValidSignature(sig, for: SHA256.hash(data: signingInput))
        case ("ES384", .p384(let key)):
            try requireLength(96)
            guard let sig = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { valid = false; break }
            valid = key.isValidSignature(sig, for: SHA384.hash(data: signingInput))
        case ("ES512", .p521(let key)):
            try requireLength(132)
            guard let sig = try? P521.Signing.ECDSASignature(rawRepresentation: signature) else { valid = false; break }
            valid = key.isValidSignature(sig, for: SHA512.hash(data: signingInput))
        case (_, .rsa(let key)) where alg.hasPrefix("RS") || alg.hasPrefix("PS"):
            let padding: _RSA.Signing.Padding = alg.hasPrefix("RS") ? .insecurePKCS1v1_5 : .PSS
            let sig = _RSA.Signing.RSASignature(rawRepresentation: signature)
            switch alg.suffix(3) {
            case "256": valid = key.isValidSignature(sig, for: SHA256.hash(data: signingInput), padding: padding)
            case "384": valid = key.isValidSignature(sig, for: SHA384.hash(data: signingInput), padding: padding)
            default: valid = key.isValidSignature(sig, for: SHA512.hash(data: signingInput), padding: padding)
            }
        default:
            throw SigilError(.invalidJWT, "JWT-SVID has alg \(alg) but its kid '\(keyID)' names an \(key) key, which cannot verify \(alg)")
        }
        guard valid else {
            throw SigilError(.invalidJWT, "JWT-SVID signature does not verify with key '\(keyID)' (\(alg)); the token was altered or signed by another key")
        }
    }

    private static func integer(_ seconds: Double) -> String {
        seconds.rounded(.down) == seconds && abs(seconds) < 1e15 ? String(Int64(seconds)) : String(seconds)
    }

    private static func format(_ seconds: Double) -> String {
        guard seconds.isFinite, abs(seconds) < 253_402_300_800 else { return integer(seconds) }
        return Date(timeIntervalSince1970: seconds).formatted(.iso8601)
    }
}

/// A JSON object key that is any string.
private struct AnyKey: CodingKey {
    var stringValue: String
    var intValue: Int? { nil }
    init(_ string: String) { stringValue = string }
    init?(stringValue: String) { self.stringValue = stringValue }
    init?(intValue: Int) { nil }
}

extension KeyedDecodingContainer where Key == AnyKey {
    /// The string value of `name`: nil when absent, a `.invalidJWT` error when present but not a string.
    fileprivate func jwtString(_ name: String, in what: String) throws -> String? {
        let key = AnyKey(name)
        guard contains(key) else { return nil }
        guard let value = try? decode(String.self, forKey: key) else {
            throw SigilError(.invalidJWT, "JWT-SVID \(what) '\(name)' is not a string")
        }
        return value
    }

    /// A NumericDate (RFC 7519: seconds since the epoch, possibly fractional).
    fileprivate func jwtNumericDate(_ name: String) throws -> Double? {
        let key = AnyKey(name)
        guard contains(key) else { return nil }
        guard let value = try? decode(Double.self, forKey: key), value.isFinite else {
            throw SigilError(.invalidJWT, "JWT-SVID claim '\(name)' is not a number of seconds since the epoch")
        }
        return value
    }
}

private struct JOSEHeader: Decodable {
    var alg: String?
    var kid: String?
    var typ: String?
    var hasCrit: Bool

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: AnyKey.self)
        alg = try container.jwtString("alg", in: "header")
        kid = try container.jwtString("kid", in: "header")
        typ = try container.jwtString("typ", in: "header")
        hasCrit = container.contains(AnyKey("crit"))
    }
}

private struct JWTClaims: Decodable {
    var sub: String?
    var aud: [String]?
    var exp: Double?
    var nbf: Double?
    var iat: Double?

    init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: AnyKey.self)
        sub = try container.jwtString("sub", in: "claim")
        let audKey = AnyKey("aud")
        if container.contains(audKey) {
            // RFC 7519 section 4.1.3: a single string or an array of strings.
            if let single = try? container.decode(String.self, forKey: audKey) {
                aud = [single]
            } else if let many = try? container.decode([String].self, forKey: audKey) {
                aud = many
            } else {
                throw SigilError(.invalidJWT, "JWT-SVID claim 'aud' is neither a string nor an array of strings")
            }
        }
        exp = try container.jwtNumericDate("exp")
        nbf = try container.jwtNumericDate("nbf")
        iat = try container.jwtNumericDate("iat")
    }
}
