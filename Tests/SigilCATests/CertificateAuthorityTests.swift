import Testing
import Foundation
import X509
import SwiftASN1
import Crypto
import SigilCore
import SigilCA
import SigilStore
import SigilTestSupport

@Suite("CertificateAuthority")
struct CertificateAuthorityTests {
    let td = try! TrustDomain("example.org")

    func csr(_ key: Certificate.PrivateKey = TestPKI.p256(), extensions: Certificate.Extensions = Certificate.Extensions()) throws -> [UInt8] {
        let request = try CertificateSigningRequest(
            version: .v1, subject: DistinguishedName { CommonName("w") }, privateKey: key,
            attributes: CertificateSigningRequest.Attributes([try .init(ExtensionRequest(extensions: extensions))]),
            signatureAlgorithm: .ecdsaWithSHA256)
        var serializer = DER.Serializer()
        try serializer.serialize(request)
        return serializer.serializedBytes
    }

    func mode(_ path: String) throws -> Int {
        try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as! Int
    }

    @Test func initWritesPrivateKeysAndABundle() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path + "/ca")
        let summary = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td))
        #expect(summary.authorities.map(\.kind) == [.root, .intermediate])
        #expect(try mode(dir.path) == 0o700)
        #expect(try mode(dir.keysPath) == 0o700)
        let keys = try FileManager.default.contentsOfDirectory(atPath: dir.keysPath)
        #expect(keys.count == 2)
        for key in keys {
            #expect(try mode(dir.keysPath + "/" + key) == 0o600)
            let text = try String(contentsOfFile: dir.keysPath + "/" + key, encoding: .utf8)
            #expect(text.hasPrefix("-----BEGIN PRIVATE KEY-----"), "PKCS#8")
        }
        let bundle = try TrustBundle(pem: String(contentsOfFile: dir.bundlePEMPath, encoding: .utf8), trustDomain: td)
        #expect(bundle.authorities.map(\.authorityID) == [summary.authorities[0].id])
    }

    @Test func refusesToOverwriteUnlessForced() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path)
        let first = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td))
        let other = try TrustDomain("other.org")
        do throws(CAError) {
            _ = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: other))
            Issue.record("overwrote an existing CA")
        } catch {
            #expect(error.code == .alreadyInitialized)
            #expect(error.message.contains("--force") && error.message.contains("example.org"))
        }
        let (bundle, _) = try await CertificateAuthority.inspect(dir)
        #expect(bundle.authorities.first?.authorityID == first.authorities[0].id)

        let second = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td, force: true))
        let moved = try #require(second.replacedTo)
        #expect(FileManager.default.fileExists(atPath: moved + "/keys/" + first.authorities[0].id + ".key.pem"), "old CA moved aside, not deleted")
        #expect(second.authorities[0].id != first.authorities[0].id)
    }

    @Test func signsABatchAndRecordsEveryRow() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path)
        _ = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td))
        let ca = try await CertificateAuthority.open(dir)
        let good = try SigningRequest(bytes: csr())
        let requests = [
            (good, try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/one"))),
            (good, try SVIDProfile(spiffeID: SpiffeID("spiffe://other.org/ns/a/sa/two"))),
            (good, try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/three"), ttl: .seconds(60))),
        ]
        let results = await ca.signBatch(requests, requester: "test")
        #expect(results.map { (try? $0.get()) != nil } == [true, false, true])
        let svid = try results[0].get()
        #expect(svid.chainDER.count == 2)
        #expect(try Certificate(derEncoded: svid.chainDER[1]).isCertificateAuthority)
        #expect(try svid.certificate.spiffeID == SpiffeID("spiffe://example.org/ns/a/sa/one"))
        let status = try await ca.status()
        #expect(status.first { $0.record.kind == .intermediate }?.issuedCount == 2)
    }

    @Test func csrExtensionsAreNeverCopied() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path)
        _ = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td))
        let ca = try await CertificateAuthority.open(dir)
        let greedy = try csr(extensions: Certificate.Extensions {
            Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
            SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://evil.org/x"), .dnsName("evil.com")])
        })
        let request = try SigningRequest(bytes: greedy)
        #expect(request.requestedExtensionCount == 2)
        let svid = try await ca.sign(request, profile: SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/b")), requester: "test")
        #expect(try !svid.certificate.isCertificateAuthority)
        #expect(try svid.certificate.extensions.subjectAlternativeNames == SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://example.org/ns/a/sa/b")]))
    }

    @Test func badCSRsAreRefused() throws {
        var tampered = try csr()
        tampered[tampered.count - 5] ^= 0x01
        #expect(throws: CAError.self) { try SigningRequest(bytes: tampered) }
        #expect(throws: CAError.self) { try SigningRequest(bytes: []) }
        #expect(throws: CAError.self) { try SigningRequest(bytes: Array("-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n".utf8)) }
        #expect(throws: CAError.self) { try SigningRequest(bytes: Array("hello".utf8)) }
        let p521 = Certificate.PrivateKey(P521.Signing.PrivateKey())
        let request = try CertificateSigningRequest(version: .v1, subject: DistinguishedName { CommonName("w") }, privateKey: p521,
                                                   attributes: .init(), signatureAlgorithm: .ecdsaWithSHA512)
        #expect(throws: CAError.self) { try SigningRequest(csr: request) }
    }

    @Test func keyFilesReadableByOthersAreRefused() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path)
        let summary = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td))
        let keyPath = dir.keyPath(authorityID: summary.authorities[1].id)
        chmod(keyPath, 0o644)
        do throws(CAError) {
            _ = try await CertificateAuthority.open(dir)
            Issue.record("opened a CA whose key is world-readable")
        } catch {
            #expect(error.code == .keyFile)
            #expect(error.message.contains("chmod 600"))
        }
    }

    @Test func unwritableDataDirectories() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        #expect(FileManager.default.createFile(atPath: tmp.path + "/file", contents: Data()))
        for path in [tmp.path + "/file", tmp.path + "/file/sub", "/proc/sigil-test-ca"] {
            do throws(CAError) {
                _ = try await CertificateAuthority.initialize(DataDirectory(path), options: CAInitOptions(trustDomain: td))
                Issue.record("initialized a CA in \(path)")
            } catch {
                #expect(error.code == .dataDirectory, "\(path): \(error)")
            }
        }
    }

    @Test func openWithoutInitSaysWhatToRun() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        do throws(CAError) {
            _ = try await CertificateAuthority.open(DataDirectory(tmp.path))
            Issue.record("opened an empty directory")
        } catch {
            #expect(error.code == .notInitialized)
            #expect(error.message.contains("sigil ca init"))
        }
    }
}
