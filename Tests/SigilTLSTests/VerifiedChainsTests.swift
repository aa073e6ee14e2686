import Testing
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import SwiftASN1
import X509
import SigilCore
import SigilTestSupport
@testable import SigilTLS

/// The handshake verification callback with its cache of verified chains: a cached verdict holds
/// only for the same chain bytes, the same bundle and inside the chain's validity.
struct VerifiedChainsTests {
    static let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)

    struct Peer {
        let pki: TestPKI
        let bundle: TrustBundle
        let chain: [NIOSSLCertificate]
        let certificates: [Certificate]
        let id: SpiffeID
    }

    func peer(_ name: String, trustDomain: String = "example.org") throws -> Peer {
        let pki = try TestPKI(trustDomain: trustDomain)
        let id = try SpiffeID("spiffe://\(trustDomain)/ns/test/sa/\(name)")
        let leaf = try SVIDProfile(spiffeID: id).makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: Date())
        let certificates = [leaf, pki.intermediate.certificate]
        let chain = try certificates.map { certificate -> NIOSSLCertificate in
            var serializer = DER.Serializer()
            try serializer.serialize(certificate)
            return try NIOSSLCertificate(bytes: serializer.serializedBytes, format: .der)
        }
        let bundle = try TrustBundle(trustDomain: pki.trustDomain, authorities: [pki.root.certificate])
        return Peer(pki: pki, bundle: bundle, chain: chain, certificates: certificates, id: id)
    }

    /// Runs the callback once; true if it accepted the chain.
    func accepts(_ chain: [NIOSSLCertificate], bundle: TrustBundle, expectedPeer: SpiffeID? = nil) async throws -> Bool {
        let callback = SpiffeTLS.verificationCallback(bundle: { bundle }, expectedPeer: expectedPeer)
        let promise = Self.group.next().makePromise(of: NIOSSLVerificationResultWithMetadata.self)
        callback(chain, promise)
        switch try await promise.futureResult.get() {
        case .certificateVerified: return true
        case .failed: return false
        }
    }

    @Test("an X509-SVID leaf without a keyUsage extension is refused (X509-SVID §4.3), with it accepted")
    func leafWithoutKeyUsage() async throws {
        let pki = try TestPKI()
        let bundle = try TrustBundle(trustDomain: pki.trustDomain, authorities: [pki.root.certificate])
        let key = TestPKI.p256()
        func leaf(keyUsage: Bool) throws -> Certificate {
            var extensions: [Certificate.Extension] = [
                try Certificate.Extension(BasicConstraints.notCertificateAuthority, critical: true),
                try Certificate.Extension(SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://example.org/ns/test/sa/x")]), critical: false),
            ]
            if keyUsage { extensions.append(try Certificate.Extension(KeyUsage(digitalSignature: true), critical: true)) }
            return try Certificate(version: .v3, serialNumber: .init(), publicKey: key.publicKey,
                                   notValidBefore: Date().addingTimeInterval(-60), notValidAfter: Date().addingTimeInterval(600),
                                   issuer: pki.intermediate.certificate.subject, subject: try DistinguishedName { CommonName("x") },
                                   signatureAlgorithm: .ecdsaWithSHA256, extensions: try Certificate.Extensions(extensions),
                                   issuerPrivateKey: pki.intermediate.privateKey)
        }
        let verifier = SpiffeVerifier(bundle: bundle)
        let refused = await #expect(throws: SigilError.self) {
            _ = try await verifier.verify(chain: [try leaf(keyUsage: false), pki.intermediate.certificate])
        }
        #expect(refused?.message.contains("keyUsage") == true)
        #expect(try await verifier.verify(chain: [try leaf(keyUsage: true), pki.intermediate.certificate]).description
                == "spiffe://example.org/ns/test/sa/x")
    }

    @Test("a verified chain is remembered for its bundle only, and the peer check still applies")
    func cachedVerdicts() async throws {
        let a = try peer("a")
        let stranger = try peer("s")  // same trust domain name, another root
        #expect(try await accepts(a.chain, bundle: a.bundle))
        let key = VerifiedChains.key(try a.chain.map { try $0.toDERBytes() })
        #expect(VerifiedChains.shared.lookup(key, bundle: a.bundle, now: Date()) == a.id)
        // The same bytes under another bundle: no cached verdict, and the full check refuses it.
        #expect(VerifiedChains.shared.lookup(key, bundle: stranger.bundle, now: Date()) == nil)
        #expect(try await accepts(a.chain, bundle: stranger.bundle) == false)
        // Again under its own bundle (from the cache), with the peer check on top.
        #expect(try await accepts(a.chain, bundle: a.bundle))
        #expect(try await accepts(a.chain, bundle: a.bundle, expectedPeer: a.id))
        #expect(try await accepts(a.chain, bundle: a.bundle, expectedPeer: stranger.id) == false)
        // A bundle that changed (here: one more authority) is another bundle.
        var grown = a.bundle
        try grown.add(stranger.pki.root.certificate)
        #expect(VerifiedChains.shared.lookup(key, bundle: grown, now: Date()) == nil)
        #expect(try await accepts(a.chain, bundle: grown))
    }

    @Test("an entry ends with the shortest validity of the chain and the bundle; failures are not stored")
    func validityAndFailures() async throws {
        let a = try peer("v")
        let key = VerifiedChains.key(try a.chain.map { try $0.toDERBytes() })
        VerifiedChains.shared.store(key, chain: a.certificates, bundle: a.bundle, id: a.id)
        let leaf = a.certificates[0]
        #expect(VerifiedChains.shared.lookup(key, bundle: a.bundle, now: leaf.notValidAfter.addingTimeInterval(-1)) == a.id)
        #expect(VerifiedChains.shared.lookup(key, bundle: a.bundle, now: leaf.notValidAfter.addingTimeInterval(1)) == nil)
        #expect(VerifiedChains.shared.lookup(key, bundle: a.bundle, now: leaf.notValidBefore.addingTimeInterval(-1)) == nil)

        // A chain from another trust domain fails and leaves nothing behind.
        let foreign = try peer("f", trustDomain: "other.example")
        let foreignKey = VerifiedChains.key(try foreign.chain.map { try $0.toDERBytes() })
        #expect(try await accepts(foreign.chain, bundle: a.bundle) == false)
        #expect(VerifiedChains.shared.lookup(foreignKey, bundle: a.bundle, now: Date()) == nil)
        #expect(VerifiedChains.shared.lookup(foreignKey, bundle: foreign.bundle, now: Date()) == nil)
    }
}
