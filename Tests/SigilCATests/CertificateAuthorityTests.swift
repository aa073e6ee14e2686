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

    /// The intermediate rotates on schedule with time passed in as a value: prepared at 1/2 of its
    /// life, active at 5/6, the old one kept while an SVID it signed is live, then removed.
    @Test func intermediateRotatesOnScheduleAndOldStaysWhileItsSVIDsLive() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path + "/ca")
        let t0 = Date()
        let summary = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td, caTTL: .seconds(600)), clock: FixedClock(t0))
        let first = summary.authorities[1]
        let life = first.notAfter.timeIntervalSince(first.createdAt)  // notBefore is backdated for clock skew; the schedule is not
        func at(_ fraction: Double, plus seconds: Double = 0) async throws -> CertificateAuthority {
            try await CertificateAuthority.open(dir, clock: FixedClock(first.createdAt.addingTimeInterval(life * fraction + seconds)))
        }
        let schedule = RotationSchedule()
        #expect(try await at(0.4).rotateIfDue(schedule).isEmpty)
        let early = try await at(0.49)
        // an SVID signed just before the switch, valid past it
        let late = try await at(0.8)
        let kept = try await late.sign(try SigningRequest(bytes: csr()), profile: try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/kept"), ttl: .seconds(600)), requester: "test")
        #expect(kept.record.authorityID == first.id)
        #expect(try await early.rotateIfDue(schedule).isEmpty)
        let prepared = try await at(0.51).rotateIfDue(schedule)
        guard case .prepare(replacing: first.id) = try #require(prepared.first) else { Issue.record("not prepared: \(prepared)"); return }
        let (_, afterPrepare) = try await CertificateAuthority.inspect(dir)
        let next = try #require(afterPrepare.first { $0.record.state == .prepared })
        #expect(FileManager.default.fileExists(atPath: dir.keyPath(authorityID: next.record.id)))
        #expect(try await at(0.7).rotateIfDue(schedule).isEmpty)  // prepared, not yet due
        let switching = try await at(0.84)
        #expect(try await switching.rotateIfDue(schedule) == [.activate(next.record.id)])
        #expect(await switching.activeAuthorityID == next.record.id)
        let svid = try await switching.sign(try SigningRequest(bytes: csr()), profile: try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/web")), requester: "test")
        #expect(svid.record.authorityID == next.record.id)
        #expect(try Certificate(derEncoded: svid.chainDER[1]).authorityID == next.record.id)
        // the old one stays while `kept` is live, and goes after it expired (its key with it)
        #expect(try await at(0.85).rotateIfDue(schedule).isEmpty)
        let afterExpiry = try await CertificateAuthority.open(dir, clock: FixedClock(kept.record.notAfter.addingTimeInterval(1)))
        #expect(try await afterExpiry.rotateIfDue(schedule).contains(.remove(first.id)))
        let (_, final) = try await CertificateAuthority.inspect(dir)
        #expect(final.first { $0.record.id == first.id }?.record.state == .removed)
        #expect(!FileManager.default.fileExists(atPath: dir.keyPath(authorityID: first.id)))
        // another process's rotation is picked up by reload()
        let other = try await at(0.86)
        let manual = try await other.prepareIntermediate(requester: "cli")
        try await other.activate(manual.id, requester: "cli")
        #expect(try await switching.reload())
        #expect(await switching.activeAuthorityID == manual.id)
    }

    /// Upstream-CA mode: moving to a new upstream key pair is a switch of trust like a root
    /// rotation: the new upstream root is published, the switch waits for the readiness gate, and
    /// the old upstream chain goes once nothing under it is left.
    @Test func movesToANewUpstreamCAThroughTheGate() async throws {
        let tmp = try TemporaryDirectory()
        defer { tmp.remove() }
        let dir = DataDirectory(tmp.path + "/ca")
        let t0 = Date()
        func upstream(_ name: String) throws -> UpstreamCA {
            let key = TestPKI.p256()
            let root = try CAProfile(trustDomain: td, ttl: .seconds(86_400 * 365), commonName: name, maxPathLength: 2).makeRoot(key: key, now: t0)
            return UpstreamCA(chain: [root], key: key, roots: [root])
        }
        let first = try upstream("Corp Root 1"), second = try upstream("Corp Root 2")
        _ = try await CertificateAuthority.initialize(dir, options: CAInitOptions(trustDomain: td, upstream: first), clock: FixedClock(t0))
        let ca = try await CertificateAuthority.open(dir, clock: FixedClock(t0.addingTimeInterval(10)))
        let oldIntermediate = await ca.activeAuthorityID
        let svid = try await ca.sign(try SigningRequest(bytes: csr()), profile: try SVIDProfile(spiffeID: SpiffeID("spiffe://example.org/ns/a/sa/web"), ttl: .seconds(60)), requester: "test")
        let next = try await ca.prepareUpstream(second, requester: "test")
        let (bundle, _) = try await CertificateAuthority.inspect(dir)
        #expect(Set(bundle.authorities.map(\.authorityID)) == [first.roots[0].authorityID, second.roots[0].authorityID])
        #expect(try await ca.rotateIfDue(RotationSchedule()) == [.activateRoot(second.roots[0].authorityID, intermediate: next.id)])
        #expect(await ca.activeAuthorityID == next.id)
        let (_, status) = try await CertificateAuthority.inspect(dir)
        func state(_ id: String) -> AuthorityState? { status.first { $0.record.id == id }?.record.state }
        #expect(state(first.roots[0].authorityID) == .old && state(oldIntermediate) == .old && state(second.roots[0].authorityID) == .active)
        // after the last SVID under the old chain expired: the intermediate, then its upstream root, go
        let later = try await CertificateAuthority.open(dir, clock: FixedClock(svid.record.notAfter.addingTimeInterval(1)))
        #expect(try await later.rotateIfDue(RotationSchedule()) == [.remove(oldIntermediate), .remove(first.roots[0].authorityID)])
        let (after, _) = try await CertificateAuthority.inspect(dir)
        #expect(after.authorities.map(\.authorityID) == [second.roots[0].authorityID])
    }
}
