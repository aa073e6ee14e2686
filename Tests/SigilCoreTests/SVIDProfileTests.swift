import Testing
import Foundation
@_spi(FixedExpiryValidationTime) import X509
import Crypto
import SwiftASN1
import _CryptoExtras
import SigilCore
import SigilTestSupport

/// Every rule of the X509-SVID spec that ``SVIDProfile`` and ``CAProfile`` promise, one test each.
@Suite("SVIDProfile")
struct SVIDProfileTests {
    let now = Date(timeIntervalSince1970: 1_800_000_000)
    let id = try! SpiffeID("spiffe://example.org/ns/default/sa/web")

    func issue(ttl: Duration = .seconds(3600), dns: [String] = [], key: Certificate.PrivateKey = TestPKI.p256(), pki: TestPKI? = nil) throws -> (Certificate, TestPKI) {
        let pki = try pki ?? TestPKI(now: now)
        let leaf = try SVIDProfile(spiffeID: id, ttl: ttl, dnsNames: dns).makeCertificate(publicKey: key.publicKey, issuer: pki.intermediate, now: now)
        return (leaf, pki)
    }

    @Test func exactlyOneURISANWithTheID() throws {
        let (leaf, _) = try issue(dns: ["web.default.svc"])
        #expect(leaf.uriSANs == [id.description])
        #expect(leaf.spiffeID == id)
        let sans = try #require(try leaf.extensions.subjectAlternativeNames)
        #expect(sans.contains(.dnsName("web.default.svc")))
        #expect(sans.count == 2)
    }

    /// The subject's CN is the first DNS name of at most 64 characters (RFC 5280's bound).
    @Test func commonNameStaysWithinRFC5280Bound() throws {
        let long = String(repeating: "a", count: 63) + "." + String(repeating: "b", count: 40)
        let (leaf, _) = try issue(dns: [long, "web.default.svc"])
        #expect(leaf.subject.description.contains("CN=web.default.svc"))
        let (only, _) = try issue(dns: [long])
        #expect(!only.subject.description.contains("CN="))
        #expect(try only.extensions.subjectAlternativeNames?.contains(.dnsName(long)) == true)
    }

    @Test func basicConstraintsCriticalNotCA() throws {
        let (leaf, _) = try issue()
        let ext = try #require(leaf.extensions[oid: .X509ExtensionID.basicConstraints])
        #expect(ext.critical)
        #expect(try leaf.extensions.basicConstraints == .notCertificateAuthority)
    }

    @Test func keyUsageCriticalDigitalSignatureOnlyForEC() throws {
        let (leaf, _) = try issue()
        let ext = try #require(leaf.extensions[oid: .X509ExtensionID.keyUsage])
        #expect(ext.critical)
        let ku = try #require(try leaf.extensions.keyUsage)
        #expect(ku.digitalSignature)
        #expect(!ku.keyEncipherment)
        #expect(!ku.keyCertSign)
        #expect(!ku.cRLSign)
    }

    @Test func keyEnciphermentForRSAKeys() throws {
        let rsa = Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048))
        let (leaf, _) = try issue(key: rsa)
        let ku = try #require(try leaf.extensions.keyUsage)
        #expect(ku.digitalSignature && ku.keyEncipherment && !ku.keyCertSign && !ku.cRLSign)
    }

    @Test func extendedKeyUsageServerAndClient() throws {
        let (leaf, _) = try issue()
        let eku = try #require(try leaf.extensions.extendedKeyUsage)
        #expect(eku.contains(.serverAuth))
        #expect(eku.contains(.clientAuth))
    }

    @Test func randomSerialOf128Bits() throws {
        let pki = try TestPKI(now: now)
        var serials = Set<String>()
        for _ in 0..<50 {
            let (leaf, _) = try issue(pki: pki)
            #expect(leaf.serialHex.count == 32, "128 bits = 32 hex digits")
            #expect(leaf.serialNumber.bytes.count == 16 && leaf.serialNumber.bytes.first! & 0x80 != 0, "exactly 128 bits")
            serials.insert(leaf.serialHex)
        }
        #expect(serials.count == 50)
    }

    @Test func notBeforeBackdatedForClockSkew() throws {
        let (leaf, _) = try issue()
        #expect(leaf.notValidBefore == now.addingTimeInterval(-30))
    }

    @Test func notAfterIsNowPlusTTL() throws {
        let (leaf, _) = try issue(ttl: .seconds(600))
        #expect(leaf.notValidAfter == now.addingTimeInterval(600))
    }

    @Test func notAfterClampedToIssuer() throws {
        let pki = try TestPKI(now: now, caTTL: .seconds(1800))
        let (leaf, _) = try issue(ttl: .seconds(7200), pki: pki)
        #expect(leaf.notValidAfter == pki.intermediate.certificate.notValidAfter)
    }

    @Test func signedByIssuerWithMatchingKeyIdentifiers() throws {
        let (leaf, pki) = try issue()
        #expect(pki.intermediate.certificate.publicKey.isValidSignature(leaf.signature, for: leaf))
        #expect(leaf.issuer == pki.intermediate.certificate.subject)
        let aki = try #require(try leaf.extensions.authorityKeyIdentifier)
        let ski = try #require(try pki.intermediate.certificate.extensions.subjectKeyIdentifier)
        #expect(aki.keyIdentifier == ski.keyIdentifier)
        #expect(try leaf.extensions.subjectKeyIdentifier != nil)
    }

    @Test func chainVerifiesWithSwiftCertificatesVerifier() async throws {
        let (leaf, pki) = try issue()
        var verifier = Verifier(rootCertificates: CertificateStore([pki.root.certificate])) {
            RFC5280Policy(fixedExpiryValidationTime: now)
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore([pki.intermediate.certificate]))
        guard case .validCertificate(let chain) = result else {
            Issue.record("chain did not validate: \(result)")
            return
        }
        #expect(chain.count == 3)
    }

    @Test func refusesTrustDomainIDAsLeaf() throws {
        #expect(throws: SigilError.self) { try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org")) }
    }

    @Test func refusesOtherTrustDomain() throws {
        let pki = try TestPKI(now: now)
        let other = try SVIDProfile(spiffeID: SpiffeID("spiffe://other.org/ns/a/sa/b"))
        #expect(throws: SigilError.self) { try other.makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now) }
    }

    @Test func refusesTooShortTTLAndBadDNS() throws {
        #expect(throws: SigilError.self) { try SVIDProfile(spiffeID: id, ttl: .seconds(5)) }
        #expect(throws: SigilError.self) { try SVIDProfile(spiffeID: id, dnsNames: ["bad_name"]) }
        #expect(throws: SigilError.self) { try SVIDProfile(spiffeID: id, dnsNames: ["-x.example"]) }
        #expect(try SVIDProfile(spiffeID: id, dnsNames: ["*.svc.example"]).dnsNames.count == 1)
    }

    @Test func refusesExpiredOrNotYetValidIssuer() throws {
        let pki = try TestPKI(now: now, caTTL: .seconds(600))
        let profile = try SVIDProfile(spiffeID: id)
        #expect(throws: SigilError.self) { try profile.makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now.addingTimeInterval(3600)) }
        #expect(throws: SigilError.self) { try profile.makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now.addingTimeInterval(-3600)) }
    }

    @Test func refusesANonCAIssuer() throws {
        let key = TestPKI.p256()
        let (leaf, _) = try issue(key: key)
        // A workload holding its own SVID and key must not be able to sign another SVID with them.
        let notCA = try SigningAuthority(certificate: leaf, privateKey: key)
        #expect(throws: SigilError.self) {
            try SVIDProfile(spiffeID: id).makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: notCA, now: now)
        }
    }

    @Test func refusesWeakAndUnsupportedKeys() throws {
        let pki = try TestPKI(now: now)
        let profile = try SVIDProfile(spiffeID: id)
        let p521 = Certificate.PrivateKey(P521.Signing.PrivateKey())
        #expect(throws: SigilError.self) { try profile.makeCertificate(publicKey: p521.publicKey, issuer: pki.intermediate, now: now) }
        let ed = Certificate.PrivateKey(Curve25519.Signing.PrivateKey())
        #expect(throws: SigilError.self) { try profile.makeCertificate(publicKey: ed.publicKey, issuer: pki.intermediate, now: now) }
        let p384 = Certificate.PrivateKey(P384.Signing.PrivateKey())
        #expect(try profile.makeCertificate(publicKey: p384.publicKey, issuer: pki.intermediate, now: now).spiffeID == id)
    }

    // MARK: the CA's direct DER encoder

    @Test(arguments: [false, true])
    func encoderMatchesTheSwiftCertificatesBuilderByteForByte(rsa: Bool) throws {
        let pki = try TestPKI(now: now, caTTL: .seconds(1800))
        let key = rsa ? Certificate.PrivateKey(try _RSA.Signing.PrivateKey(keySize: .bits2048)) : TestPKI.p256()
        for (ttl, dns) in [(Duration.seconds(600), [String]()), (.seconds(7200), ["web.default.svc", "*.web.example"])] {
            let profile = try SVIDProfile(spiffeID: id, ttl: ttl, dnsNames: dns)
            let serial = Certificate.SerialNumber.random128()
            let reference = try profile.makeCertificate(publicKey: key.publicKey, issuer: pki.intermediate, now: now, serialNumber: serial)
            let encoded = try profile.encodeLeaf(publicKey: key.publicKey, issuer: pki.intermediate, now: now, serialNumber: serial)
            let parsed = try Certificate(derEncoded: encoded.der)
            #expect(Array(parsed.tbsCertificateBytes) == Array(reference.tbsCertificateBytes))
            #expect(pki.intermediate.certificate.publicKey.isValidSignature(parsed.signature, for: parsed))
            #expect(encoded.serialHex == reference.serialHex)
            #expect(encoded.notBefore == reference.notValidBefore && encoded.notAfter == reference.notValidAfter)
        }
    }

    @Test func encoderWritesGeneralizedTimeFrom2050() throws {
        let later = Date(timeIntervalSince1970: 2_600_000_000) // 2052
        let pki = try TestPKI(now: later)
        let profile = try SVIDProfile(spiffeID: id)
        let serial = Certificate.SerialNumber.random128()
        let key = TestPKI.p256()
        let reference = try profile.makeCertificate(publicKey: key.publicKey, issuer: pki.intermediate, now: later, serialNumber: serial)
        let encoded = try profile.encodeLeaf(publicKey: key.publicKey, issuer: pki.intermediate, now: later, serialNumber: serial)
        #expect(Array(try Certificate(derEncoded: encoded.der).tbsCertificateBytes) == Array(reference.tbsCertificateBytes))
    }

    @Test func encoderAppliesTheSameRules() throws {
        let pki = try TestPKI(now: now)
        let other = try SVIDProfile(spiffeID: SpiffeID("spiffe://other.org/ns/a/sa/b"))
        #expect(throws: SigilError.self) { try other.encodeLeaf(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now) }
        let profile = try SVIDProfile(spiffeID: id)
        #expect(throws: SigilError.self) { try profile.encodeLeaf(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now.addingTimeInterval(30 * 86_400)) }
        let p521 = Certificate.PrivateKey(P521.Signing.PrivateKey())
        #expect(throws: SigilError.self) { try profile.encodeLeaf(publicKey: p521.publicKey, issuer: pki.intermediate, now: now) }
    }

    // MARK: CA profile

    @Test func caProfileRules() throws {
        let pki = try TestPKI(now: now)
        for (cert, pathLength) in [(pki.root.certificate, 1), (pki.intermediate.certificate, 0)] {
            let bc = try #require(cert.extensions[oid: .X509ExtensionID.basicConstraints])
            #expect(bc.critical)
            #expect(try cert.extensions.basicConstraints == .isCertificateAuthority(maxPathLength: pathLength))
            let kuExt = try #require(cert.extensions[oid: .X509ExtensionID.keyUsage])
            #expect(kuExt.critical)
            let ku = try #require(try cert.extensions.keyUsage)
            #expect(ku.keyCertSign && ku.cRLSign && !ku.digitalSignature)
            #expect(cert.uriSANs == ["spiffe://example.org"])
        }
        #expect(pki.root.certificate.issuer == pki.root.certificate.subject)
        #expect(pki.root.certificate.publicKey.isValidSignature(pki.root.certificate.signature, for: pki.root.certificate))
    }

    @Test func intermediateCannotSignAnotherIntermediate() throws {
        let pki = try TestPKI(now: now)
        let profile = try CAProfile(trustDomain: pki.trustDomain, ttl: .seconds(3600), commonName: "x", maxPathLength: 0)
        #expect(throws: SigilError.self) { try profile.makeIntermediate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: now) }
    }

    @Test func signingAuthorityRejectsMismatchedKey() throws {
        let pki = try TestPKI(now: now)
        #expect(throws: SigilError.self) { try SigningAuthority(certificate: pki.root.certificate, privateKey: TestPKI.p256()) }
    }
}

@Suite("DurationText")
struct DurationTextTests {
    @Test(arguments: [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("7d", 604_800), (" 2h ", 7200)])
    func parses(_ text: String, _ seconds: Int64) throws {
        #expect(try DurationText.parse(text) == .seconds(seconds))
    }

    @Test(arguments: ["", "10", "h", "1x", "-5m", "1.5h", "99999999999999999999d"])
    func rejects(_ text: String) {
        #expect(throws: SigilError.self) { try DurationText.parse(text) }
    }

    @Test func formats() {
        #expect(DurationText.format(.seconds(5400)) == "1h30m")
        #expect(DurationText.format(.seconds(0)) == "0s")
        #expect(DurationText.format(.seconds(86_401)) == "1d1s")
    }
}
