import Crypto
import Foundation
import SigilCore
import SigilTestSupport
import SwiftASN1
import Testing
import X509
@testable import SigilProxy

/// The inbound proxy's per-leaf facts are a pure function of the certificate's bytes: the cached
/// answer must equal a fresh parse, and nothing that fails is kept.
struct PeerLeafFactsTests {
    @Test func factsEqualAFreshParseAndAreKeptOnce() throws {
        let pki = try TestPKI(trustDomain: "shop.example")
        let id = try SpiffeID("spiffe://shop.example/ns/shop/sa/web")
        let leaf = try SVIDProfile(spiffeID: id).makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: Date())
        var serializer = DER.Serializer()
        try serializer.serialize(leaf)
        let der = serializer.serializedBytes
        let cache = PeerLeafFacts()
        let first = try cache.facts(der: der)
        #expect(first.spiffeID == "spiffe://shop.example/ns/shop/sa/web")
        #expect(first.principal == "shop.example/ns/shop/sa/web")
        #expect(first.serial == leaf.serialHex)
        #expect(first.hash == hex(SHA256.hash(data: der)))
        #expect(first.notBefore == leaf.notValidBefore && first.notAfter == leaf.notValidAfter)
        // What a resumed session checks again: the leaf's validity window.
        #expect(first.validity(at: leaf.notValidBefore.addingTimeInterval(1)) == nil)
        #expect(first.validity(at: leaf.notValidAfter.addingTimeInterval(1))?.hasPrefix("expired at") == true)
        #expect(first.validity(at: leaf.notValidBefore.addingTimeInterval(-1))?.hasPrefix("is not valid before") == true)
        let again = try cache.facts(der: der)
        #expect(again.spiffeID == first.spiffeID && again.serial == first.serial && again.hash == first.hash)
        #expect(cache.count == 1)

        // Another leaf of the same workload is another entry with its own serial and hash.
        let second = try SVIDProfile(spiffeID: id).makeCertificate(publicKey: TestPKI.p256().publicKey, issuer: pki.intermediate, now: Date())
        var other = DER.Serializer()
        try other.serialize(second)
        let facts2 = try cache.facts(der: other.serializedBytes)
        #expect(facts2.serial != first.serial && facts2.hash != first.hash && cache.count == 2)

        // A certificate without a URI SAN and bytes that are no certificate throw and are not kept.
        let key = TestPKI.p256()
        let name = try DistinguishedName { CommonName("no-san") }
        let plain = try Certificate(version: .v3, serialNumber: .init(), publicKey: key.publicKey,
                                    notValidBefore: Date(), notValidAfter: Date().addingTimeInterval(3600), issuer: name, subject: name,
                                    signatureAlgorithm: .ecdsaWithSHA256, extensions: .init(), issuerPrivateKey: key)
        var plainDER = DER.Serializer()
        try plainDER.serialize(plain)
        #expect { try cache.facts(der: plainDER.serializedBytes) } throws: { error in
            (error as? ProxyError)?.message == "peer certificate has no SPIFFE ID"
        }
        #expect(throws: (any Error).self) { try cache.facts(der: [0x30, 0x03, 0x02, 0x01, 0x01]) }
        #expect(cache.count == 2)
    }
}
