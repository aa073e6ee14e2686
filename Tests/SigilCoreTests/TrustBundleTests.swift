import Testing
import Foundation
import X509
import SigilCore
import SigilTestSupport

@Suite("TrustBundle")
struct TrustBundleTests {
    @Test func spiffeBundleFollowsTheSpec() throws {
        let pki = try TestPKI()
        let bundle = try TrustBundle(trustDomain: pki.trustDomain, authorities: [pki.root.certificate], sequenceNumber: 7, refreshHint: .seconds(300))
        let json = bundle.spiffeBundleJSON()
        let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        #expect(object["spiffe_sequence"] as? Int == 7)
        #expect(object["spiffe_refresh_hint"] as? Int == 300)
        let keys = try #require(object["keys"] as? [[String: Any]])
        #expect(keys.count == 1)
        let key = keys[0]
        #expect(key["use"] as? String == "x509-svid")
        #expect(key["kty"] as? String == "EC")
        #expect(key["crv"] as? String == "P-256")
        #expect(key["kid"] == nil)
        let x5c = try #require(key["x5c"] as? [String])
        #expect(x5c.count == 1)
        #expect(Data(base64Encoded: x5c[0]).map(Array.init) == pki.root.certificate.derBytes)
        for coordinate in ["x", "y"] {
            let value = try #require(key[coordinate] as? String)
            #expect(!value.contains("=") && !value.contains("+") && !value.contains("/"), "base64url without padding")
            #expect(value.count == 43, "32 bytes")
        }
    }

    @Test func roundTripsThroughJSONAndPEM() throws {
        let a = try TestPKI()
        let b = try TestPKI()
        let bundle = try TrustBundle(trustDomain: a.trustDomain, authorities: [a.root.certificate, b.root.certificate, a.root.certificate], sequenceNumber: 3)
        #expect(bundle.authorities.count == 2, "duplicates collapse")
        let parsed = try TrustBundle(spiffeBundleJSON: bundle.spiffeBundleJSON(), trustDomain: a.trustDomain)
        #expect(parsed.authorities == bundle.authorities)
        #expect(parsed.sequenceNumber == 3)
        let fromPEM = try TrustBundle(pem: bundle.pemEncoded, trustDomain: a.trustDomain)
        #expect(fromPEM.authorities == bundle.authorities)
    }

    /// The SPIFFE specs' MUST-ignore rules: a reader takes what it can use and skips the rest.
    @Test func ignoresWhatTheSpecSaysToIgnore() throws {
        let pki = try TestPKI()
        let good = try #require(try JSONSerialization.jsonObject(with: Data(TrustBundle(trustDomain: pki.trustDomain, authorities: [pki.root.certificate]).spiffeBundleJSON().utf8)) as? [String: Any])
        var key = try #require((good["keys"] as? [[String: Any]])?.first)
        let x5c = try #require(key["x5c"] as? [String])
        key["x5c"] = x5c + [x5c[0]]  // several: only the first counts
        let elements: [Any] = [
            key,
            ["kty": "EC", "use": "x509-svid"],                       // no x5c: ignored
            ["kty": "EC", "use": "x509-svid", "x5c": [] as [String]], // empty x5c: ignored
            ["kty": "OKP", "use": "x509-svid", "x5c": x5c],          // unknown key type: ignored
            ["use": "x509-svid", "x5c": x5c],                        // not a JWK (no kty): ignored
            ["kty": "EC", "use": "something-else", "x5c": x5c],      // unknown use: ignored
            ["kty": "EC", "use": "x509-svid", "x5c": 7],             // wrong type: ignored
        ]
        let json = String(decoding: try JSONSerialization.data(withJSONObject: ["keys": elements, "spiffe_sequence": 4]), as: UTF8.self)
        let bundle = try TrustBundle(spiffeBundleJSON: json, trustDomain: pki.trustDomain)
        #expect(bundle.authorities == [pki.root.certificate])
        #expect(bundle.sequenceNumber == 4)
    }

    @Test func refusesLeavesAndBrokenDocuments() throws {
        let pki = try TestPKI()
        let leaf = try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/x")).makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: Date())
        #expect(throws: SigilError.self) { try TrustBundle(trustDomain: pki.trustDomain, authorities: [leaf]) }
        #expect(throws: SigilError.self) { try TrustBundle(spiffeBundleJSON: "not json", trustDomain: pki.trustDomain) }
        let notACertificate = #"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AAAA"]}]}"#
        #expect(throws: SigilError.self) { try TrustBundle(spiffeBundleJSON: notACertificate, trustDomain: pki.trustDomain) }
        // A JWK whose parameters do not match its certificate is refused.
        var json = try TrustBundle(trustDomain: pki.trustDomain, authorities: [pki.root.certificate]).spiffeBundleJSON()
        let otherX = try #require(try JSONSerialization.jsonObject(with: Data(TrustBundle(trustDomain: pki.trustDomain, authorities: [TestPKI().root.certificate]).spiffeBundleJSON().utf8)) as? [String: Any])
        let x = ((otherX["keys"] as! [[String: Any]])[0]["x"] as! String)
        let mine = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
        json = json.replacingOccurrences(of: (mine["keys"] as! [[String: Any]])[0]["x"] as! String, with: x)
        #expect(throws: SigilError.self) { try TrustBundle(spiffeBundleJSON: json, trustDomain: pki.trustDomain) }
        // JWT keys are skipped; a bundle with nothing else has no X.509 authority to offer.
        let jwtOnly = #"{"keys":[{"kty":"EC","use":"jwt-svid","kid":"k1","crv":"P-256","x":"a","y":"b"}]}"#
        let none = #expect(throws: SigilError.self) { try TrustBundle(spiffeBundleJSON: jwtOnly, trustDomain: pki.trustDomain) }
        #expect(none?.message.contains("no usable x509-svid key") == true)
    }
}
