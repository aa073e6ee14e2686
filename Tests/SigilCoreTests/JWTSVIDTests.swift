import Testing
import Foundation
import Crypto
import SigilCore

@Suite("JWT-SVID")
struct JWTSVIDTests {
    static let td = try! TrustDomain("example.org")
    static let client = try! SpiffeID("spiffe://example.org/ns/default/sa/client")
    static let now = Date(timeIntervalSince1970: 1_750_000_000)

    let key = JWTSigningKey()
    var bundle: JWTBundle {
        var bundle = JWTBundle(trustDomain: Self.td)
        try! bundle.add(key)
        return bundle
    }

    func token(audience: [String] = ["sigil"], ttl: Duration = .seconds(300), now: Date = Self.now) throws -> String {
        try JWTSVIDSigner().sign(spiffeID: Self.client, audience: audience, ttl: ttl, now: now, key: key)
    }

    func validate(_ token: String, audience: String = "sigil", now: Date = Self.now, validator: JWTSVIDValidator = JWTSVIDValidator()) throws(SigilError) -> (spiffeID: SpiffeID, claimsJSON: [UInt8]) {
        try validator.validate(token: token, audience: audience, bundle: bundle, now: now)
    }

    /// Expects a `.invalidJWT` rejection whose message contains `fragment`.
    func expectRejected(_ token: String, _ fragment: String, audience: String = "sigil", now: Date = Self.now,
                        sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            _ = try validate(token, audience: audience, now: now)
            Issue.record("token was accepted; expected a rejection mentioning \"\(fragment)\"", sourceLocation: sourceLocation)
        } catch {
            #expect(error.code == .invalidJWT, "\(error.message)", sourceLocation: sourceLocation)
            #expect(error.message.contains(fragment), "message was: \(error.message)", sourceLocation: sourceLocation)
        }
    }

    /// A compact JWS of any header and claims, signed with ES256 by `signer` (default: the bundle's key).
    func handMade(header: String, claims: String, signer: P256.Signing.PrivateKey? = nil) throws -> String {
        let input = b64(Array(header.utf8)) + "." + b64(Array(claims.utf8))
        let signature = try (signer ?? key.privateKey).signature(for: Array(input.utf8))
        return input + "." + b64(Array(signature.rawRepresentation))
    }

    func validClaims(sub: String = "spiffe://example.org/ns/default/sa/client", aud: String = #"["sigil"]"#, exp: Int = 1_750_000_300) -> String {
        #"{"sub":"\#(sub)","aud":\#(aud),"exp":\#(exp),"iat":1750000000}"#
    }

    var es256Header: String { #"{"alg":"ES256","kid":"\#(key.keyID)","typ":"JWT"}"# }

    func b64(_ bytes: [UInt8]) -> String {
        Data(bytes).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
    }

    func unb64(_ text: Substring) throws -> [UInt8] {
        var s = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while s.count % 4 != 0 { s += "=" }
        return Array(try #require(Data(base64Encoded: s)))
    }

    func jsonObject(_ bytes: [UInt8]) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(bytes)) as? [String: Any])
    }

    // MARK: Signing and the happy path

    @Test func roundTripFollowsTheSpec() throws {
        let token = try token()
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        #expect(parts.count == 3)
        #expect(!token.contains("=") && !token.contains("+") && !token.contains("/"), "base64url without padding")
        #expect(String(decoding: try unb64(parts[0]), as: UTF8.self) == #"{"alg":"ES256","kid":"\#(key.keyID)","typ":"JWT"}"#)
        #expect(try unb64(parts[2]).count == 64, "raw r||s, not DER")

        let result = try validate(token)
        #expect(result.spiffeID == Self.client)
        #expect(result.claimsJSON == (try unb64(parts[1])), "claims returned as received")
        let claims = try jsonObject(result.claimsJSON)
        #expect(claims["sub"] as? String == "spiffe://example.org/ns/default/sa/client")
        #expect(claims["aud"] as? [String] == ["sigil"])
        #expect(claims["iat"] as? Int == 1_750_000_000)
        #expect(claims["exp"] as? Int == 1_750_000_300)
        #expect(Set(claims.keys) == ["sub", "aud", "exp", "iat"])
    }

    @Test func multipleAudiencesAnyOneMatches() throws {
        let token = try token(audience: ["a", "spiffe://example.org/ns/x/sa/server"])
        #expect(try validate(token, audience: "spiffe://example.org/ns/x/sa/server").spiffeID == Self.client)
        #expect(try validate(token, audience: "a").spiffeID == Self.client)
    }

    @Test func signerRefusesBadArguments() throws {
        let signer = JWTSVIDSigner()
        let cases: [(SpiffeID, [String], Duration)] = [
            (Self.client, [], .seconds(60)),
            (Self.client, [""], .seconds(60)),
            (Self.client, ["a"], .zero),
            (Self.client, ["a"], .milliseconds(500)),
            (Self.td.id, ["a"], .seconds(60)),
        ]
        for (id, audience, ttl) in cases {
            #expect(throws: SigilError.self, "\(id) \(audience) \(ttl)") {
                try signer.sign(spiffeID: id, audience: audience, ttl: ttl, now: Self.now, key: key)
            }
        }
        #expect(throws: SigilError.self) { try JWTSigningKey(privateKey: .init(), keyID: "") }
        #expect(throws: SigilError.self) { try JWTSigningKey(privateKey: .init(), keyID: "has space") }
    }

    @Test func randomKeyIDsAre32HexCharacters() {
        let ids = Set((0..<50).map { _ in JWTSigningKey.randomKeyID() })
        #expect(ids.count == 50)
        for id in ids {
            #expect(id.count == 32)
            #expect(id.allSatisfy { $0.isHexDigit && !$0.isUppercase })
        }
        #expect(JWTSigningKey().keyID != JWTSigningKey().keyID)
    }

    // MARK: Tampering and signatures

    @Test func tamperedPayloadIsRejected() throws {
        let parts = try token().split(separator: ".")
        let forged = validClaims(sub: "spiffe://example.org/ns/default/sa/admin")
        expectRejected(parts[0] + "." + b64(Array(forged.utf8)) + "." + parts[2], "signature does not verify")
    }

    @Test func tamperedSignatureIsRejected() throws {
        let parts = try token().split(separator: ".")
        var signature = try unb64(parts[2])
        signature[10] ^= 0x01
        expectRejected(parts[0] + "." + parts[1] + "." + b64(signature), "signature does not verify")
        // Signed by a key that is not in the bundle but claiming the bundle's kid.
        expectRejected(try handMade(header: es256Header, claims: validClaims(), signer: P256.Signing.PrivateKey()), "signature does not verify")
        // A DER signature is not the JWS form.
        let der = try key.privateKey.signature(for: Array((parts[0] + "." + parts[1]).utf8)).derRepresentation
        expectRejected(parts[0] + "." + parts[1] + "." + b64(Array(der)), "64-byte r||s")
        // An empty signature.
        expectRejected(parts[0] + "." + parts[1] + ".", "64-byte r||s")
    }

    @Test func algNoneIsRejected() throws {
        for alg in ["none", "None", "NONE"] {
            let header = #"{"alg":"\#(alg)","kid":"\#(key.keyID)","typ":"JWT"}"#
            let token = b64(Array(header.utf8)) + "." + b64(Array(validClaims().utf8)) + "."
            expectRejected(token, "unsigned tokens are never accepted")
        }
    }

    @Test func algHS256IsRejectedEvenWhenKeyedWithThePublicKey() throws {
        // The classic confusion attack: HMAC keyed with the verifier's public key.
        let header = #"{"alg":"HS256","kid":"\#(key.keyID)","typ":"JWT"}"#
        let input = b64(Array(header.utf8)) + "." + b64(Array(validClaims().utf8))
        for secret in [key.publicKey.x963Representation, key.publicKey.derRepresentation, Data(key.publicKey.pemRepresentation.utf8)] {
            let mac = HMAC<SHA256>.authenticationCode(for: Array(input.utf8), using: SymmetricKey(data: secret))
            expectRejected(input + "." + b64(Array(mac)), "alg 'HS256'")
        }
        for alg in ["HS384", "HS512", "EdDSA", "ES256K", "es256", ""] {
            expectRejected(try handMade(header: #"{"alg":"\#(alg)","kid":"\#(key.keyID)"}"#, claims: validClaims()), "which the JWT-SVID spec does not allow")
        }
        expectRejected(try handMade(header: #"{"kid":"\#(key.keyID)"}"#, claims: validClaims()), "no 'alg'")
        expectRejected(try handMade(header: #"{"alg":256,"kid":"\#(key.keyID)"}"#, claims: validClaims()), "'alg' is not a string")
    }

    @Test func algMustSuitTheKey() throws {
        // ES384 claimed for a P-256 key.
        expectRejected(try handMade(header: #"{"alg":"ES384","kid":"\#(key.keyID)"}"#, claims: validClaims()), "cannot verify ES384")
        expectRejected(try handMade(header: #"{"alg":"RS256","kid":"\#(key.keyID)"}"#, claims: validClaims()), "cannot verify RS256")
    }

    @Test func headerRules() throws {
        // kid missing, unknown, and of the wrong type.
        expectRejected(try handMade(header: #"{"alg":"ES256","typ":"JWT"}"#, claims: validClaims()), "no 'kid'")
        expectRejected(try handMade(header: #"{"alg":"ES256","kid":"nope","typ":"JWT"}"#, claims: validClaims()), "unknown kid 'nope'")
        expectRejected(try handMade(header: #"{"alg":"ES256","kid":7}"#, claims: validClaims()), "'kid' is not a string")
        // typ JWT, JOSE or absent only.
        expectRejected(try handMade(header: #"{"alg":"ES256","kid":"\#(key.keyID)","typ":"at+jwt"}"#, claims: validClaims()), "typ 'at+jwt'")
        for typ in [#","typ":"JOSE""#, ""] {
            let token = try handMade(header: #"{"alg":"ES256","kid":"\#(key.keyID)"\#(typ)}"#, claims: validClaims())
            #expect(try validate(token).spiffeID == Self.client)
        }
        // crit is never understood.
        expectRejected(try handMade(header: #"{"alg":"ES256","kid":"\#(key.keyID)","crit":["exp"]}"#, claims: validClaims()), "'crit'")
        // Header not an object.
        expectRejected(try handMade(header: #"["ES256"]"#, claims: validClaims()), "header is not a JSON object")
    }

    @Test func unknownKidNamesTheKid() throws {
        let other = JWTSigningKey()
        let token = try JWTSVIDSigner().sign(spiffeID: Self.client, audience: ["sigil"], ttl: .seconds(60), now: Self.now, key: other)
        expectRejected(token, "unknown kid '\(other.keyID)'")
    }

    // MARK: Claims

    @Test func wrongAudienceIsRejected() throws {
        let token = try token(audience: ["a", "b"])
        expectRejected(token, "audience 'c' not in token audiences ['a', 'b']", audience: "c")
        expectRejected(token, "audience 'A' not in token audiences", audience: "A")
        #expect(throws: SigilError.self) { try validate(token, audience: "") }
    }

    @Test func audienceAsAStringIsAccepted() throws {
        let token = try handMade(header: es256Header, claims: validClaims(aud: #""sigil""#))
        #expect(try validate(token).spiffeID == Self.client)
        expectRejected(token, "audience 'other' not in token audiences ['sigil']", audience: "other")
    }

    @Test func missingOrMalformedAudienceIsRejected() throws {
        let noAud = #"{"sub":"spiffe://example.org/ns/default/sa/client","exp":1750000300}"#
        expectRejected(try handMade(header: es256Header, claims: noAud), "no 'aud' claim")
        expectRejected(try handMade(header: es256Header, claims: validClaims(aud: "[]")), "empty array")
        expectRejected(try handMade(header: es256Header, claims: validClaims(aud: "[1]")), "neither a string nor an array of strings")
        expectRejected(try handMade(header: es256Header, claims: validClaims(aud: "null")), "neither a string nor an array of strings")
    }

    @Test func expiredTokenIsRejected() throws {
        let token = try token(ttl: .seconds(300))
        #expect(try validate(token, now: Self.now.addingTimeInterval(299.9)).spiffeID == Self.client)
        expectRejected(token, "JWT-SVID has expired at 2025-06-15T15:11:40Z (exp 1750000300)", now: Self.now.addingTimeInterval(300))
        expectRejected(token, "has expired at", now: Self.now.addingTimeInterval(86_400))
        // A validator may grant leeway, explicitly.
        let lenient = JWTSVIDValidator(expiryLeeway: .seconds(30))
        #expect(try validate(token, now: Self.now.addingTimeInterval(320), validator: lenient).spiffeID == Self.client)
        #expect(throws: SigilError.self) { try validate(token, now: Self.now.addingTimeInterval(330), validator: lenient) }
    }

    @Test func missingOrMalformedExpIsRejected() throws {
        let noExp = #"{"sub":"spiffe://example.org/ns/default/sa/client","aud":"sigil"}"#
        expectRejected(try handMade(header: es256Header, claims: noExp), "no 'exp' claim")
        let stringExp = #"{"sub":"spiffe://example.org/ns/default/sa/client","aud":"sigil","exp":"1750000300"}"#
        expectRejected(try handMade(header: es256Header, claims: stringExp), "'exp' is not a number")
        // A fractional NumericDate is allowed by RFC 7519.
        let fractional = #"{"sub":"spiffe://example.org/ns/default/sa/client","aud":"sigil","exp":1750000300.5}"#
        #expect(try validate(try handMade(header: es256Header, claims: fractional)).spiffeID == Self.client)
        expectRejected(try handMade(header: es256Header, claims: "[]"), "payload is not a JSON object")
    }

    @Test func futureNotBeforeAndIssuedAtAreRejectedBeyondTheSkew() throws {
        func claims(_ extra: String) -> String {
            #"{"sub":"spiffe://example.org/ns/default/sa/client","aud":"sigil","exp":1750003600,\#(extra)}"#
        }
        #expect(try validate(try handMade(header: es256Header, claims: claims(#""nbf":1750000030,"iat":1750000030"#))).spiffeID == Self.client)
        expectRejected(try handMade(header: es256Header, claims: claims(#""nbf":1750000031"#)), "not valid before 2025-06-15T15:07:11Z (nbf 1750000031), which is in the future")
        expectRejected(try handMade(header: es256Header, claims: claims(#""iat":1750000600"#)), "issued at 2025-06-15T15:16:40Z (iat 1750000600), which is in the future")
        // Signing a token "now" and validating it with a clock a little behind is fine.
        #expect(try validate(try token(now: Self.now.addingTimeInterval(20))).spiffeID == Self.client)
    }

    @Test func subjectMustBeASpiffeIDOfTheBundlesTrustDomain() throws {
        expectRejected(try handMade(header: es256Header, claims: validClaims(sub: "client")), "subject 'client' is not a SPIFFE ID")
        expectRejected(try handMade(header: es256Header, claims: validClaims(sub: "spiffe://Example.org/x")), "is not a SPIFFE ID")
        expectRejected(try handMade(header: es256Header, claims: validClaims(sub: "https://example.org/ns/a/sa/b")), "is not a SPIFFE ID")
        expectRejected(try handMade(header: es256Header, claims: validClaims(sub: "spiffe://evil.org/ns/default/sa/client")),
                       "subject spiffe://evil.org/ns/default/sa/client is in trust domain evil.org, but the bundle it was checked against is of example.org")
        let noSub = #"{"aud":"sigil","exp":1750000300}"#
        expectRejected(try handMade(header: es256Header, claims: noSub), "no 'sub' claim")
        // A token signed by another trust domain's key is refused by this bundle even with a matching kid.
        let other = try JWTBundle(trustDomain: TrustDomain("evil.org"), authorities: [key.keyID: JWTPublicKey(key.publicKey)])
        #expect(throws: SigilError.self) {
            try JWTSVIDValidator().validate(token: try token(), audience: "sigil", bundle: other, now: Self.now)
        }
    }

    // MARK: Encoding

    @Test func malformedBase64IsRejected() throws {
        let parts = try token().split(separator: ".").map(String.init)
        expectRejected(parts[0] + "=." + parts[1] + "." + parts[2], "header is not base64url")
        expectRejected(parts[0] + "." + parts[1].replacingOccurrences(of: "e", with: "+") + "." + parts[2], "payload is not base64url")
        expectRejected(parts[0] + "." + parts[1] + "." + parts[2] + "==", "signature is not base64url")
        expectRejected(parts[0] + "." + parts[1] + "." + parts[2] + "AAA", "signature is not base64url")  // 86 + 3 = 4n+1 characters: impossible length
        expectRejected(parts[0] + "." + parts[1] + " ." + parts[2], "payload is not base64url")
        // Standard base64 ('/', '+') is not base64url.
        let std = Data(try unb64(Substring(parts[2]))).base64EncodedString()
        if std.contains("/") || std.contains("+") {
            expectRejected(parts[0] + "." + parts[1] + "." + std.replacingOccurrences(of: "=", with: ""), "signature is not base64url")
        }
        // The last character of a 64-byte signature carries 2 unused bits; a non-canonical spelling is refused.
        let last = parts[2].last!
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        let index = alphabet.firstIndex(of: last)!
        let sibling = alphabet[index ^ 1]
        expectRejected(parts[0] + "." + parts[1] + "." + parts[2].dropLast() + String(sibling), "signature")
        // Valid base64url of something that is not JSON.
        expectRejected(b64(Array("not json".utf8)) + "." + parts[1] + "." + parts[2], "header is not a JSON object")
    }

    @Test func wrongNumberOfPartsIsRejected() throws {
        let token = try token()
        let parts = token.split(separator: ".").map(String.init)
        expectRejected(parts[0] + "." + parts[1], "has 2 dot-separated parts")
        expectRejected(token + "." + parts[2], "has 4 dot-separated parts")
        expectRejected(parts[0] + "." + parts[1] + "." + parts[2] + "..", "has 5 dot-separated parts")
        expectRejected("notajwt", "has 1 dot-separated parts")
        expectRejected("", "JWT-SVID is empty")
        expectRejected(String(repeating: "a", count: 70_000), "bytes long")
    }

    // MARK: The JWT bundle (JWKS)

    @Test func jwksRoundTrip() throws {
        let second = JWTSigningKey()
        var bundle = self.bundle
        try bundle.add(second)
        try bundle.add(second)  // idempotent
        #expect(bundle.authorities.count == 2)
        let json = bundle.jwksJSON()
        let text = String(decoding: json, as: UTF8.self)
        #expect(text.hasPrefix(#"{"keys":[{"crv":"P-256","kid":""#), "sorted keys, one line: \(text)")
        #expect(!text.contains(" ") && !text.contains("\n"))
        let keys = try #require(try jsonObject(json)["keys"] as? [[String: Any]])
        #expect(keys.count == 2)
        #expect(keys.map { $0["kid"] as? String } == [key.keyID, second.keyID].sorted().map { Optional($0) })
        for jwk in keys {
            #expect(jwk["kty"] as? String == "EC")
            #expect(jwk["crv"] as? String == "P-256")
            #expect(jwk["use"] as? String == "jwt-svid")
            #expect((jwk["x"] as? String)?.count == 43)
            #expect((jwk["y"] as? String)?.count == 43)
            #expect(Set(jwk.keys) == ["kty", "crv", "x", "y", "kid", "use"])
        }
        let parsed = try JWTBundle(jwksJSON: json, trustDomain: Self.td)
        #expect(parsed == bundle)
        #expect(parsed.jwksJSON() == json)
        // A token signed by either key validates against the parsed bundle.
        let token = try JWTSVIDSigner().sign(spiffeID: Self.client, audience: ["sigil"], ttl: .seconds(60), now: Self.now, key: second)
        #expect(try JWTSVIDValidator().validate(token: token, audience: "sigil", bundle: parsed, now: Self.now).spiffeID == Self.client)
        // Removing a key makes its tokens unknown.
        var rotated = parsed
        let removed = rotated.remove(keyID: second.keyID)
        #expect(removed)
        #expect(throws: SigilError.self) { try JWTSVIDValidator().validate(token: token, audience: "sigil", bundle: rotated, now: Self.now) }
    }

    @Test func jwksKeepsOnlyJWTSVIDKeysOfKnownTypes() throws {
        let mine = String(decoding: bundle.jwksJSON(), as: UTF8.self)
        let jwk = String(mine.dropFirst(#"{"keys":["#.count).dropLast(2))
        let document = """
        {"spiffe_sequence": 4, "keys": [
          {"kty":"EC","use":"x509-svid","crv":"P-256","x":"a","y":"b","x5c":["AAAA"]},
          {"kty":"OKP","use":"jwt-svid","kid":"ed","crv":"Ed25519","x":"abc"},
          {"kty":"EC","use":"jwt-svid","kid":"k256","crv":"secp256k1","x":"a","y":"b"},
          {"kty":"EC","use":"future-svid","kid":"f","crv":"P-256","x":"a","y":"b"},
          {"kty":"EC","kid":"nouse","crv":"P-256","x":"a","y":"b"},
          \(jwk)
        ]}
        """
        let parsed = try JWTBundle(jwksJSON: document, trustDomain: Self.td)
        #expect(parsed.authorities.keys.sorted() == [key.keyID])
        #expect(parsed == bundle)
        // Broken jwt-svid keys are refused, each with a reason.
        let broken: [(String, String)] = [
            (#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"a","y":"b"}]}"#, "no 'kid'"),
            (#"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"AAAA","y":"AAAA"}]}"#, "exactly 32"),
            (#"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"a=","y":"b"}]}"#, "malformed"),
            (#"{"keys":[{"kty":"RSA","use":"jwt-svid","kid":"k","n":"AQAB","e":"AQAB"}]}"#, "at least 2048"),
            (#"{"keys":[{"use":"jwt-svid","kid":"k"}]}"#, "is not a JWK object"),
            (#"{"keys":{}}"#, "not a valid JWK Set"),
            ("[]", "not a valid JWK Set"),
            ("not json", "not a valid JWK Set"),
        ]
        for (json, fragment) in broken {
            do {
                _ = try JWTBundle(jwksJSON: json, trustDomain: Self.td)
                Issue.record("accepted \(json)")
            } catch {
                #expect(error.message.contains(fragment), "\(json): \(error.message)")
            }
        }
        // A point not on the curve.
        let offCurve = #"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k","crv":"P-256","x":"\#(b64([UInt8](repeating: 1, count: 32)))","y":"\#(b64([UInt8](repeating: 2, count: 32)))"}]}"#
        #expect(throws: SigilError.self) { try JWTBundle(jwksJSON: offCurve, trustDomain: Self.td) }
        // The same kid for two different keys.
        let other = String(decoding: try JWTBundle(trustDomain: Self.td, authorities: [key.keyID: JWTPublicKey(P256.Signing.PrivateKey().publicKey)]).jwksJSON(), as: UTF8.self)
        let otherJWK = String(other.dropFirst(#"{"keys":["#.count).dropLast(2))
        do {
            _ = try JWTBundle(jwksJSON: #"{"keys":[\#(jwk),\#(otherJWK)]}"#, trustDomain: Self.td)
            Issue.record("accepted two keys with one kid")
        } catch {
            #expect(error.code == .invalidBundle)
            #expect(error.message.contains("already has a different key with kid"))
        }
    }

    // MARK: Interoperability: tokens made by PyJWT (an independent implementation)

    // Made once with PyJWT 2.15.1 + cryptography 48 (fresh keys; see the JWT-SVID report): iat 1700000000, exp 1700003600,
    // sub spiffe://example.org/ns/py/sa/client, aud "sigil" (a string), plus a private claim "extra".
    static let pyJWKS = #"{"keys": [{"crv": "P-256", "kid": "py-ec", "kty": "EC", "use": "jwt-svid", "x": "pYXrQgwRvjiMhHgbdQFfSgsz1JPJeonV8yiTiIHP1KE", "y": "SEksDIvK_OxoV7KEKrWnVxDuukc8nOAbKmhSOctGmnM"}, {"e": "AQAB", "key_ops": ["verify"], "kid": "py-rsa", "kty": "RSA", "n": "52t1GYcpPaVq7NYahVLnswD37jVhul_-sMOFpsthcaOXOC7ta5LsC5t1m9OC1pzye6xmWe7-Ga_RXeCl1gTIHpULQpLaayeFtmjx-fVJMhHU5lVkKvxEbEeZvomQpxFR04ujLTzjIkG-ZGI0q5H8e8teHjasT7Ps1Pj_WDU9Y7lrnEBH_O54F7mefpI0JsiYyVZkcUSmzexvvgJ2a9BAVsrvrAynrc56DmwhMf8uvS1rymJyBfkB6z2cp0yWJgtXhjElWBYqI-srKLYaH5XdNPWEQWYaEkzS4nJbohHzxnfQWWh5ocOhOOug6i0MMp418O3vgC1HT70WCYoRlWEGgQ", "use": "jwt-svid"}, {"crv": "P-384", "kid": "py-p384", "kty": "EC", "use": "jwt-svid", "x": "DK_IxMom5cF8nrpiwUiTVJdkORcXgBeoy-68s7McqE0LYjR_2FKtWdeeiMitqFRB", "y": "PnYDYhsJuxnvcS9VZmBQYuRlD4VVqViBlEp98igR16-IJlhrsV_AI2SWql7R9pj9"}]}"#
    static let pyES256 = "eyJhbGciOiJFUzI1NiIsImtpZCI6InB5LWVjIiwidHlwIjoiSldUIn0.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9ucy9weS9zYS9jbGllbnQiLCJhdWQiOiJzaWdpbCIsImV4cCI6MTcwMDAwMzYwMCwiaWF0IjoxNzAwMDAwMDAwLCJleHRyYSI6ImtlcHQifQ.UMDn2guKeRSDBc8EB_rrIH-d8R-tF7-2o7AcsZ3Kq5uMY8cpsaGIM4Dr2qYGMQrj6t9V9kceHl2s6Q9MFskHVw"
    static let pyES384 = "eyJhbGciOiJFUzM4NCIsImtpZCI6InB5LXAzODQiLCJ0eXAiOiJKV1QifQ.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9ucy9weS9zYS9jbGllbnQiLCJhdWQiOiJzaWdpbCIsImV4cCI6MTcwMDAwMzYwMCwiaWF0IjoxNzAwMDAwMDAwLCJleHRyYSI6ImtlcHQifQ.T46v-J6x38eBHwXVDZg9-KPOtTYOKcCFbasrwdFxqpMMyjXckQCom58mZ3oVlYsZjeyn3v_xBrdLAi1FP8jUapdJC-WZ72KqefRHXYdBeAEZ68Tl1MA1B7WOxvcJrdzM"
    static let pyRS256 = "eyJhbGciOiJSUzI1NiIsImtpZCI6InB5LXJzYSIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9ucy9weS9zYS9jbGllbnQiLCJhdWQiOiJzaWdpbCIsImV4cCI6MTcwMDAwMzYwMCwiaWF0IjoxNzAwMDAwMDAwLCJleHRyYSI6ImtlcHQifQ.NjwZ324qMjBhJ-k-gNC6ZMZpvpCbKQKeSafYT0q6HO4NONcV5_rhANvnNeIcAR2Y3_DyMCfxHWTDaTFbGjRLWUCwoArbWuRfFxo8dVmkvGkmpDIKWpkrvk93679xATs9ELGVRQXc-DF_4AmKju3qUoLvlsvYZtCFPbriknkYXI3XW_NZd0uXi7rnGpV9QIydZbfLDtEfVJWS3F0wkiN7ot8OcXrcMWq3RAIzAQTKr0qEdTtKraEaxzNbxEEz7i9nfxu9A8A1HwufK68f-ryVNrPqaR3CcXdm8ulueGxFKzOekrcySEZOJGxe2veM4RM3UmuSBM8xkdTocw4z38spIw"
    static let pyPS256 = "eyJhbGciOiJQUzI1NiIsImtpZCI6InB5LXJzYSIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy9ucy9weS9zYS9jbGllbnQiLCJhdWQiOiJzaWdpbCIsImV4cCI6MTcwMDAwMzYwMCwiaWF0IjoxNzAwMDAwMDAwLCJleHRyYSI6ImtlcHQifQ.osX3N2gN6dduBcBFU2JP5Wbqzyo2nJP5PlTEV_fplD-cWZX-_buS48gFEN9qp609XvdgPCWEFR6gKaErvr7HuubRYEokp09TZin9Tpxv1Nv_SC10LMKtW3qPUY8oO5ktRS2rQvR3OmG-UmJyZjeLCXua_AdIaQdK9yxTvB9gJph0Z2oI9LWPLmlCUsTLJ4nOpeLSn2Jy_eVEpDNKTAhxd80-DxaWRs42o-eROND9EbS4H96bs2hm9j32Gn81Lgf4xW6A31l43A5_sIX7ETl1fThDF6cWtcasUOUDA9Tqsu2eQt4n7wtl_r9d6NiiYo_4R7NWx7u-5G-QdvbueNAHnQ"

    static let pyNow = Date(timeIntervalSince1970: 1_700_000_100)

    @Test(arguments: ["ES256", "ES384", "RS256", "PS256"])
    func validatesTokensMadeByPyJWT(alg: String) throws {
        let bundle = try JWTBundle(jwksJSON: Self.pyJWKS, trustDomain: Self.td)
        #expect(bundle.authorities.keys.sorted() == ["py-ec", "py-p384", "py-rsa"])
        let token = [
            "ES256": Self.pyES256, "ES384": Self.pyES384, "RS256": Self.pyRS256, "PS256": Self.pyPS256,
        ][alg]!
        let validator = JWTSVIDValidator()
        let result = try validator.validate(token: token, audience: "sigil", bundle: bundle, now: Self.pyNow)
        #expect(result.spiffeID == (try SpiffeID("spiffe://example.org/ns/py/sa/client")))
        #expect(try jsonObject(result.claimsJSON)["extra"] as? String == "kept", "private claims are returned as received")
        #expect(throws: SigilError.self) {
            try validator.validate(token: token, audience: "sigil", bundle: bundle, now: Date(timeIntervalSince1970: 1_700_003_600))
        }
        // The RSA key re-serializes to the same n and e PyJWT wrote.
        let reparsed = try JWTBundle(jwksJSON: bundle.jwksJSON(), trustDomain: Self.td)
        #expect(reparsed == bundle)
        #expect(bundle.publicKey(forKeyID: "py-rsa")?.description == "RSA 2048")
    }
}
