public import X509
import SwiftASN1
public import SigilCore
public import SigilStore
import Crypto
public import Foundation
public import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The files of a CA's data directory (`--data-dir`, default `pki/`):
///
///     sigil.db      SQLite: authorities, issued certificates, issuance log (0600)
///     keys/         private keys, one PKCS#8 PEM file per authority (dir 0700, files 0600)
///     bundle.pem    the trust bundle (public)
public struct DataDirectory: Sendable, Hashable {
    public let path: String
    public init(_ path: String) {
        self.path = path.count > 1 && path.hasSuffix("/") ? String(path.dropLast()) : path
    }
    public var databasePath: String { path + "/sigil.db" }
    public var keysPath: String { path + "/keys" }
    public var bundlePEMPath: String { path + "/bundle.pem" }
    public func keyPath(authorityID: String) -> String { keysPath + "/" + authorityID + ".key.pem" }

    /// Whether a CA (a database with a trust domain, or any key file) is already here.
    public var holdsCA: Bool {
        if let keys = try? FileManager.default.contentsOfDirectory(atPath: keysPath), keys.contains(where: { $0.hasSuffix(".key.pem") }) {
            return true
        }
        return FileManager.default.fileExists(atPath: databasePath)
    }
}

/// An existing CA to chain to (`--upstream-cert`, `--upstream-key`, `--upstream-bundle`).
public struct UpstreamCA: Sendable {
    /// The upstream signing certificate first, then any intermediates above it.
    public let chain: [Certificate]
    public let key: Certificate.PrivateKey
    /// The roots peers must trust: the upstream bundle, or the upstream certificate itself when self-signed.
    public let roots: [Certificate]

    public init(chain: [Certificate], key: Certificate.PrivateKey, roots: [Certificate]) {
        self.chain = chain
        self.key = key
        self.roots = roots
    }

    /// Loads and checks the upstream files.
    public static func load(certificatePath: String, keyPath: String, bundlePath: String?) throws(CAError) -> UpstreamCA {
        let chain = try readCertificates(certificatePath, what: "--upstream-cert")
        // An operator's CA key may be group-readable by design; Sigil does not insist on 0600 for it.
        let key = try KeyFiles.read(keyPath, requirePrivateMode: false)
        guard chain[0].publicKey == key.publicKey else {
            throw CAError(.invalidUpstream, "--upstream-key does not belong to the first certificate in --upstream-cert ('\(chain[0].subject)')")
        }
        guard chain[0].isCertificateAuthority else {
            throw CAError(.invalidUpstream, "--upstream-cert '\(chain[0].subject)' is not a CA certificate (basicConstraints cA is not true)")
        }
        var roots: [Certificate]
        if let bundlePath {
            roots = try readCertificates(bundlePath, what: "--upstream-bundle")
        } else {
            let selfSigned = chain.filter { $0.issuer == $0.subject }
            guard !selfSigned.isEmpty else {
                throw CAError(.invalidUpstream, "--upstream-cert '\(chain[0].subject)' is not self-signed and holds no root; pass --upstream-bundle with the upstream root certificate(s)")
            }
            roots = selfSigned
        }
        roots = roots.filter { $0.isCertificateAuthority }
        guard !roots.isEmpty else {
            throw CAError(.invalidUpstream, "the upstream bundle holds no CA certificate")
        }
        return UpstreamCA(chain: chain.filter { !roots.contains($0) || $0 == chain[0] }, key: key, roots: roots)
    }

    static func readCertificates(_ path: String, what: String) throws(CAError) -> [Certificate] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CAError(.invalidUpstream, "cannot read \(what) file '\(path)'")
        }
        do {
            return try Certificate.parseChain(pem: String(decoding: data, as: UTF8.self), what: "\(what) '\(path)'")
        } catch {
            throw CAError(.invalidUpstream, error.message)
        }
    }
}

/// Settings for `sigil ca init`.
public struct CAInitOptions: Sendable {
    public var trustDomain: TrustDomain
    public var rootTTL: Duration
    public var caTTL: Duration
    public var upstream: UpstreamCA?
    public var force: Bool

    public static let defaultRootTTL: Duration = .seconds(10 * 365 * 86_400)
    public static let defaultCATTL: Duration = .seconds(30 * 86_400)

    public init(trustDomain: TrustDomain, rootTTL: Duration = defaultRootTTL, caTTL: Duration = defaultCATTL, upstream: UpstreamCA? = nil, force: Bool = false) {
        self.trustDomain = trustDomain
        self.rootTTL = rootTTL
        self.caTTL = caTTL
        self.upstream = upstream
        self.force = force
    }
}

/// An X509-SVID as issued: the leaf and the chain to send with it (DER, leaf first, no root) and its record.
public struct IssuedSVID: Sendable {
    /// Leaf then intermediates up to (not including) a bundle root, each DER.
    public let chainDER: [[UInt8]]
    public let record: IssuedCertificate

    /// The leaf, parsed.
    public var certificate: Certificate {
        get throws { try Certificate(derEncoded: chainDER[0]) }
    }

    public var chainPEM: String { chainDER.map { pemEncode($0) }.joined() }
}

/// One authority as `sigil ca status` shows it.
public struct AuthorityStatus: Sendable, Codable {
    public let record: AuthorityRecord
    public let issuedCount: Int
    public let subject: String
    /// SVIDs in service that chain to it (signed by it or by an authority under it).
    public var live: Int = 0
    /// When the last SVID that chains to it expires.
    public var lastExpiry: Date?
}

/// The certificate authority: holds the active signing intermediate and its key, signs SVIDs from
/// checked CSRs, and records every issuance in the datastore.
public actor CertificateAuthority {
    public nonisolated let trustDomain: TrustDomain
    public nonisolated let directory: DataDirectory
    /// The datastore this CA records into.
    public nonisolated let store: any Datastore
    private let clock: any SigilClock
    private var signer: SigningAuthority
    private var signerID: String
    /// The active intermediate and its ancestors that are not bundle roots (DER).
    private var chainTailDER: [[UInt8]]
    private let logger: Logger

    init(trustDomain: TrustDomain, directory: DataDirectory, store: any Datastore, clock: any SigilClock, signer: SigningAuthority, signerID: String, chainTail: [Certificate], logger: Logger) {
        self.trustDomain = trustDomain
        self.directory = directory
        self.store = store
        self.clock = clock
        self.signer = signer
        self.signerID = signerID
        self.chainTailDER = chainTail.map(\.derBytes)
        self.logger = logger
    }

    // MARK: opening

    /// Opens the CA in `directory`.
    public static func open(_ directory: DataDirectory, clock: any SigilClock = SystemClock(), logger: Logger = Logger(label: "sigil.ca")) async throws(CAError) -> CertificateAuthority {
        guard FileManager.default.fileExists(atPath: directory.databasePath) else {
            throw CAError(.notInitialized, "no CA in '\(directory.path)': run 'sigil ca init --trust-domain <td> --data-dir \(directory.path)' first")
        }
        let store = try openStore(directory)
        let (td, records) = try await loadState(store, directory)
        let (signer, id, tail) = try loadSigner(records, directory)
        return CertificateAuthority(trustDomain: td, directory: directory, store: store, clock: clock, signer: signer, signerID: id, chainTail: tail, logger: logger)
    }

    /// The active intermediate with its key, and the chain above it up to a bundle root.
    static func loadSigner(_ records: [AuthorityRecord], _ directory: DataDirectory) throws(CAError) -> (SigningAuthority, String, [Certificate]) {
        guard let active = records.first(where: { $0.kind == .intermediate && $0.state == .active }) else {
            throw CAError(.notInitialized, "the CA in '\(directory.path)' has no active signing intermediate")
        }
        let certificate = try parse(active)
        let key = try KeyFiles.read(directory.keyPath(authorityID: active.id))
        let signer: SigningAuthority
        do {
            signer = try SigningAuthority(certificate: certificate, privateKey: key)
        } catch {
            throw CAError(.keyFile, "key file for authority \(active.id) does not match its certificate: \(error.message)")
        }
        var tail: [Certificate] = [certificate]
        var parent = active.parentID
        while let id = parent, let record = records.first(where: { $0.id == id }), !record.inBundle {
            tail.append(try parse(record))
            parent = record.parentID
        }
        return (signer, active.id, tail)
    }

    /// The authority signing now.
    public var activeAuthorityID: String { signerID }

    /// Re-reads the authorities and switches to the active intermediate if another process (or
    /// the rotation schedule) changed it. Returns whether it switched.
    @discardableResult
    public func reload() async throws(CAError) -> Bool {
        let (_, records) = try await Self.loadState(store, directory)
        guard let active = records.first(where: { $0.kind == .intermediate && $0.state == .active }), active.id != signerID else { return false }
        let (signer, id, tail) = try Self.loadSigner(records, directory)
        let previous = signerID
        self.signer = signer
        self.signerID = id
        self.chainTailDER = tail.map(\.derBytes)
        logger.info("signing with a new intermediate", metadata: ["authority": "\(id)", "previous": "\(previous)"])
        return true
    }

    // MARK: rotation

    /// Makes the next intermediate, signed by the active one's parent (the root, whose key Sigil
    /// holds), with the active one's lifetime; stores it `prepared` (its key written 0600 first).
    public func prepareIntermediate(requester: String) async throws(CAError) -> AuthorityRecord {
        let (_, records) = try await Self.loadState(store, directory)
        guard let active = records.first(where: { $0.id == signerID }),
              let parentID = active.parentID, let parent = records.first(where: { $0.id == parentID }) else {
            throw CAError(.notInitialized, "the active intermediate has no parent authority on record")
        }
        guard parent.kind == .root else {
            throw CAError(.invalidUpstream, "the active intermediate is signed by the upstream CA '\(parentID)', whose key Sigil does not keep: rotate it with `sigil ca rotate --upstream-cert F --upstream-key F`")
        }
        let issuerKey = try KeyFiles.read(directory.keyPath(authorityID: parent.id))
        let parentCertificate = try Self.parse(parent)
        let now = clock.now
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let certificate: Certificate
        do throws(SigilError) {
            let life = active.notAfter.timeIntervalSince(max(active.notBefore, min(active.createdAt, active.notAfter)))
            let profile = try CAProfile(trustDomain: trustDomain, ttl: .seconds(Int64(max(60, life.rounded()))),
                                        commonName: "Sigil Intermediate CA \(trustDomain)", maxPathLength: 0)
            let issuer = try SigningAuthority(certificate: parentCertificate, privateKey: issuerKey)
            certificate = try profile.makeIntermediate(publicKey: key.publicKey, issuer: issuer, now: now)
        } catch {
            throw CAError(.policy, "cannot make the next intermediate: \(error.message)")
        }
        let record = AuthorityRecord(id: certificate.authorityID, kind: .intermediate, state: .prepared, parentID: parent.id,
                                     notBefore: certificate.notValidBefore, notAfter: certificate.notValidAfter,
                                     fingerprint: certificate.sha256Fingerprint, certificatePEM: certificate.pemString,
                                     inBundle: false, createdAt: now)
        try KeyFiles.write(key, to: directory.keyPath(authorityID: record.id))
        do {
            try await store.addAuthority(record, at: now, requester: requester)
        } catch {
            unlink(directory.keyPath(authorityID: record.id))
            throw CAError(.store, error.message)
        }
        logger.info("prepared the next intermediate", metadata: ["authority": "\(record.id)", "not_after": "\(record.notAfter)"])
        return record
    }

    /// Makes a prepared intermediate the signing one (the previous becomes `old`) and signs with it.
    public func activate(_ id: String, requester: String) async throws(CAError) {
        let activated: Bool
        do {
            activated = try await store.activateAuthority(id: id, at: clock.now, requester: requester)
        } catch {
            throw CAError(.store, error.message)
        }
        guard activated else { throw CAError(.policy, "authority \(id) is not prepared (see `sigil ca status`)") }
        try await reload()
    }

    /// Removes an old intermediate whose SVIDs have all expired (its key file is deleted).
    public func remove(_ id: String, requester: String, detail: String) async throws(CAError) {
        let removed: Bool
        do {
            removed = try await store.transitionAuthority(id: id, from: .old, to: .removed, at: clock.now, requester: requester, detail: detail)
        } catch {
            throw CAError(.store, error.message)
        }
        if removed { unlink(directory.keyPath(authorityID: id)) }
    }

    /// An intermediate prepared under another parent than the signing one's: a switch of trust
    /// (a new root or upstream CA) waiting for the readiness gate.
    public static func pendingSwitch(_ records: [AuthorityRecord]) -> AuthorityRecord? {
        let current = records.first { $0.kind == .intermediate && $0.state == .active }
        return records.first { $0.kind == .intermediate && $0.state == .prepared && $0.parentID != current?.parentID }
    }

    /// Root rotation, step one: a new self-signed root (the current root's lifetime) and an
    /// intermediate under it (the active intermediate's lifetime), both `prepared`; the root is
    /// published in the bundle at once, beside the current one. They become active when every
    /// live agent has confirmed that bundle (see ``rotateIfDue(_:requester:)``).
    public func prepareRoot(requester: String) async throws(CAError) -> (root: AuthorityRecord, intermediate: AuthorityRecord) {
        let (_, records) = try await Self.loadState(store, directory)
        if let pending = Self.pendingSwitch(records) {
            throw CAError(.policy, "a switch to intermediate \(pending.id) is already prepared and waits for every agent to confirm the bundle (see `sigil ca status`)")
        }
        guard let root = records.first(where: { $0.kind == .root && $0.state == .active }),
              let active = records.first(where: { $0.id == signerID }) else {
            throw CAError(.invalidUpstream, "this CA chains to an upstream CA: its root is the upstream's, rotated there (then `sigil ca init --upstream-cert ...`)")
        }
        let now = clock.now
        let rootKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let intermediateKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let rootCertificate: Certificate, intermediate: Certificate
        do throws(SigilError) {
            let rootLife = root.notAfter.timeIntervalSince(max(root.notBefore, min(root.createdAt, root.notAfter)))
            let life = active.notAfter.timeIntervalSince(max(active.notBefore, min(active.createdAt, active.notAfter)))
            let rootProfile = try CAProfile(trustDomain: trustDomain, ttl: .seconds(Int64(max(60, rootLife.rounded()))),
                                            commonName: "Sigil Root CA \(trustDomain)", maxPathLength: 1)
            rootCertificate = try rootProfile.makeRoot(key: rootKey, now: now)
            let profile = try CAProfile(trustDomain: trustDomain, ttl: .seconds(Int64(max(60, life.rounded()))),
                                        commonName: "Sigil Intermediate CA \(trustDomain)", maxPathLength: 0)
            intermediate = try profile.makeIntermediate(publicKey: intermediateKey.publicKey,
                                                        issuer: try SigningAuthority(certificate: rootCertificate, privateKey: rootKey), now: now)
        } catch {
            throw CAError(.policy, "cannot make the new root: \(error.message)")
        }
        func record(_ c: Certificate, _ kind: AuthorityKind, parent: String?, inBundle: Bool) -> AuthorityRecord {
            AuthorityRecord(id: c.authorityID, kind: kind, state: .prepared, parentID: parent, notBefore: c.notValidBefore, notAfter: c.notValidAfter,
                            fingerprint: c.sha256Fingerprint, certificatePEM: c.pemString, inBundle: inBundle, createdAt: now)
        }
        let newRoot = record(rootCertificate, .root, parent: nil, inBundle: true)
        let newIntermediate = record(intermediate, .intermediate, parent: newRoot.id, inBundle: false)
        // All or nothing: both keys, then both records in one transaction; on any failure the keys
        // written are removed and the CA is as it was (no root in the bundle without its intermediate).
        let keyPaths = [directory.keyPath(authorityID: newRoot.id), directory.keyPath(authorityID: newIntermediate.id)]
        do {
            try KeyFiles.write(rootKey, to: keyPaths[0])
            try KeyFiles.write(intermediateKey, to: keyPaths[1])
        } catch {
            for path in keyPaths { unlink(path) }
            throw error
        }
        do {
            try await store.addAuthorities([newRoot, newIntermediate], at: now, requester: requester)
        } catch {
            for path in keyPaths { unlink(path) }
            throw CAError(.store, error.message)
        }
        try await writeBundleFileAfterCommit("the new root \(newRoot.id) and its intermediate are prepared and in the bundle")
        logger.info("prepared a new root; it is in the bundle and becomes active when every agent has confirmed it",
                    metadata: ["authority": "\(newRoot.id)", "intermediate": "\(newIntermediate.id)"])
        return (newRoot, newIntermediate)
    }

    /// Live SVIDs that chain to `id`: its own, or for a root, those of every intermediate under it.
    func liveSVIDs(under id: String, records: [AuthorityRecord], now: Date) async throws(CAError) -> Int {
        let usage: [String: AuthorityUsage]
        do { usage = try await store.authorityUsage(now: now, inService: true) } catch { throw CAError(.store, error.message) }
        let ids = [id] + records.filter { $0.parentID == id }.map(\.id)
        return ids.reduce(0) { $0 + (usage[$1]?.live ?? 0) }
    }

    /// `sigil ca taint`: every agent re-issues, at once, each SVID that chains to `id` (and its own).
    /// Tainting the signing intermediate first rotates to a new one; the active root cannot be
    /// tainted before a root rotation made another one active.
    public func taint(_ id: String, requester: String) async throws(CAError) {
        let (_, records) = try await Self.loadState(store, directory)
        guard let record = records.first(where: { $0.id == id }), record.state != .removed else {
            throw CAError(.unknownAuthority, "no authority \(id) that is not removed (see `sigil ca status`)")
        }
        guard record.state != .prepared else { throw CAError(.policy, "authority \(id) is only prepared: nothing chains to it yet") }
        if record.kind == .root, record.state == .active {
            throw CAError(.policy, "\(id) is the active root: rotate the root first (`sigil ca rotate --root`), then taint the old one")
        }
        if record.kind == .upstream {
            throw CAError(.policy, "\(id) belongs to the upstream CA; taint Sigil's intermediate under it instead")
        }
        if id == signerID || records.first(where: { $0.id == signerID })?.parentID == id {
            let next = try await prepareIntermediate(requester: requester)
            try await activate(next.id, requester: requester)
        }
        do {
            _ = try await store.taintAuthority(id: id, at: clock.now, requester: requester)
        } catch {
            throw CAError(.store, error.message)
        }
    }

    /// `sigil ca revoke`: takes a tainted authority out of use for good (out of the bundle for a
    /// root), once nothing live chains to it (unless `force`).
    public func revoke(_ id: String, force: Bool, requester: String) async throws(CAError) {
        let (_, records) = try await Self.loadState(store, directory)
        guard let record = records.first(where: { $0.id == id }), record.state != .removed else {
            throw CAError(.unknownAuthority, "no authority \(id) that is not removed (see `sigil ca status`)")
        }
        let tainted: [String]
        do { tainted = try await store.taintedAuthorities() } catch { throw CAError(.store, error.message) }
        guard tainted.contains(id) else { throw CAError(.policy, "taint \(id) first (`sigil ca taint \(id)`), so that agents move off it") }
        guard record.state == .old else { throw CAError(.policy, "\(id) is \(record.state.rawValue); only an old authority can be revoked") }
        let live = try await liveSVIDs(under: id, records: records, now: clock.now)
        if live > 0, !force {
            throw CAError(.policy, "\(live) live SVID(s) still chain to \(id): wait for the taint to complete (agents re-issue at once), or pass --force")
        }
        try await removeWithChildren(id, records: records, requester: requester, detail: "revoked")
    }

    /// `sigil ca retire`: removes an old authority before its schedule would, refusing while live
    /// SVIDs chain to it or agents have not confirmed the current bundle (unless `force`).
    public func retire(_ id: String, force: Bool, requester: String) async throws(CAError) {
        let (_, records) = try await Self.loadState(store, directory)
        guard let record = records.first(where: { $0.id == id }) else { throw CAError(.unknownAuthority, "no authority \(id) (see `sigil ca status`)") }
        guard record.state == .old else { throw CAError(.policy, "\(id) is \(record.state.rawValue); only an old authority can be retired") }
        let now = clock.now
        let live = try await liveSVIDs(under: id, records: records, now: now)
        let unconfirmed: [AgentRecord]
        do { unconfirmed = try await store.unconfirmedAgents(sequence: try await store.bundleSequence(), now: now) } catch { throw CAError(.store, error.message) }
        if !force, live > 0 || !unconfirmed.isEmpty {
            var reasons: [String] = []
            if live > 0 { reasons.append("\(live) live SVID(s) chain to it") }
            if !unconfirmed.isEmpty { reasons.append("agent(s) \(unconfirmed.map(\.id).joined(separator: ", ")) have not confirmed the current bundle") }
            throw CAError(.policy, "not retiring \(id): \(reasons.joined(separator: "; ")); wait, or pass --force")
        }
        try await removeWithChildren(id, records: records, requester: requester, detail: force ? "retired with --force" : "retired")
    }

    private func removeWithChildren(_ id: String, records: [AuthorityRecord], requester: String, detail: String) async throws(CAError) {
        if let child = records.first(where: { $0.parentID == id && $0.state == .active }) {
            throw CAError(.policy, "\(child.kind.rawValue) \(child.id) under \(id) is active: rotate away from it first (`sigil ca rotate`)")
        }
        for child in records where child.parentID == id && (child.state == .old || child.state == .prepared) {
            let moved = (try? await store.transitionAuthority(id: child.id, from: child.state, to: .removed, at: clock.now, requester: requester, detail: "its parent \(id) was \(detail)")) ?? false
            if moved { unlink(directory.keyPath(authorityID: child.id)) }
        }
        try await remove(id, requester: requester, detail: detail)
        try await writeBundleFile()
    }

    /// Upstream-CA mode: moves to a new upstream key pair the way a root rotation does. The new
    /// upstream certificates are recorded (its roots published in the bundle at once, if new) with a
    /// new intermediate signed by it, all `prepared`; the server switches when every live agent has
    /// confirmed the bundle (at once when the upstream roots did not change).
    public func prepareUpstream(_ upstream: UpstreamCA, requester: String) async throws(CAError) -> AuthorityRecord {
        let (_, records) = try await Self.loadState(store, directory)
        if let pending = Self.pendingSwitch(records) {
            throw CAError(.policy, "a switch to intermediate \(pending.id) is already prepared and waits for every agent to confirm the bundle (see `sigil ca status`)")
        }
        let now = clock.now
        try await Self.checkUpstream(upstream, trustDomain: trustDomain, now: now)
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let intermediate: Certificate
        do throws(SigilError) {
            let active = records.first { $0.id == signerID }
            let life = active.map { $0.notAfter.timeIntervalSince(max($0.notBefore, min($0.createdAt, $0.notAfter))) } ?? CAInitOptions.defaultCATTL.timeInterval
            let profile = try CAProfile(trustDomain: trustDomain, ttl: .seconds(Int64(max(60, life.rounded()))),
                                        commonName: "Sigil Intermediate CA \(trustDomain)", maxPathLength: 0)
            intermediate = try profile.makeIntermediate(publicKey: key.publicKey, issuer: try SigningAuthority(certificate: upstream.chain[0], privateKey: upstream.key), now: now)
        } catch {
            throw CAError(.invalidUpstream, "cannot make an intermediate under the new upstream CA: \(error.message)")
        }
        var all = upstream.roots.map { ($0, true) }
        for cert in upstream.chain where !upstream.roots.contains(cert) { all.append((cert, false)) }
        var added: [AuthorityRecord] = []
        for (cert, inBundle) in all where !records.contains(where: { $0.id == cert.authorityID && $0.state != .removed }) {
            let parent = all.first { $0.0 != cert && $0.0.subject == cert.issuer }?.0.authorityID
            added.append(AuthorityRecord(id: cert.authorityID, kind: .upstream, state: .prepared, parentID: cert.issuer == cert.subject ? nil : parent,
                                         notBefore: cert.notValidBefore, notAfter: cert.notValidAfter, fingerprint: cert.sha256Fingerprint,
                                         certificatePEM: cert.pemString, inBundle: inBundle, createdAt: now))
        }
        // Parents before children (the table's foreign key).
        var ordered: [AuthorityRecord] = []
        var known = Set(records.map(\.id))
        while !added.isEmpty {
            guard let index = added.firstIndex(where: { $0.parentID.map(known.contains) ?? true }) else {
                throw CAError(.invalidUpstream, "the upstream chain does not lead to its roots")
            }
            let next = added.remove(at: index)
            ordered.append(next)
            known.insert(next.id)
        }
        added = ordered
        let record = AuthorityRecord(id: intermediate.authorityID, kind: .intermediate, state: .prepared, parentID: upstream.chain[0].authorityID,
                                     notBefore: intermediate.notValidBefore, notAfter: intermediate.notValidAfter,
                                     fingerprint: intermediate.sha256Fingerprint, certificatePEM: intermediate.pemString, inBundle: false, createdAt: now)
        try KeyFiles.write(key, to: directory.keyPath(authorityID: record.id))
        do {
            try await store.addAuthorities(added + [record], at: now, requester: requester)
        } catch {
            unlink(directory.keyPath(authorityID: record.id))
            throw CAError(.store, error.message)
        }
        try await writeBundleFileAfterCommit("the switch to the new upstream CA is prepared (intermediate \(record.id))")
        logger.info("prepared a switch to a new upstream CA", metadata: ["intermediate": "\(record.id)", "new_upstream_certificates": "\(added.count)"])
        return record
    }

    /// ``writeBundleFile()`` after a change the store has committed: a failure here must not read
    /// as "nothing happened" (a retry would then meet the prepared change), so it says what is done
    /// and that only `bundle.pem` is stale.
    func writeBundleFileAfterCommit(_ done: String) async throws(CAError) {
        do {
            try await writeBundleFile()
        } catch {
            throw CAError(error.code, "\(done), but \(directory.bundlePEMPath) could not be rewritten (\(error.message)); "
                          + "once there is space, rewrite it with `sigil bundle show --data-dir \(directory.path) > \(directory.bundlePEMPath)`")
        }
    }

    /// Rewrites `bundle.pem` in the data directory (what new agents are given with --trust-bundle).
    func writeBundleFile() async throws(CAError) {
        let bundle = try await bundle()
        try KeyFiles.writeAtomically(Array(bundle.pemEncoded.utf8), to: directory.bundlePEMPath, mode: 0o644)
    }

    /// Applies what `schedule` says is due now; returns the steps taken.
    public func rotateIfDue(_ schedule: RotationSchedule, requester: String = "server") async throws(CAError) -> [RotationSchedule.Step] {
        let (_, records) = try await Self.loadState(store, directory)
        let now = clock.now
        var usage: [String: AuthorityUsage] = [:]
        var unconfirmed = 0
        do {
            // Usage (a scan of the issued certificates) matters only for old authorities.
            if records.contains(where: { $0.state == .old }) { usage = try await store.authorityUsage(now: now, inService: false) }
            if Self.pendingSwitch(records) != nil {
                unconfirmed = try await store.unconfirmedAgents(sequence: try await store.bundleSequence(), now: now).count
            }
        } catch {
            throw CAError(.store, error.message)
        }
        let steps = schedule.steps(records, usage: usage, now: now, unconfirmedAgents: unconfirmed)
        var deferred: CAError?
        for step in steps {
            switch step {
            case .prepare:
                // Upstream mode cannot prepare by itself: say so, and still take the other steps.
                do { _ = try await prepareIntermediate(requester: requester) } catch where error.code == .invalidUpstream { deferred = error }
            case .activate(let id): try await activate(id, requester: requester)
            case .activateRoot(let parent, let intermediate):
                // The new intermediate and its prepared ancestors become active; the signing one and
                // those of its ancestors the new chain does not share become old.
                func ancestors(_ id: String?) -> [AuthorityRecord] {
                    var out: [AuthorityRecord] = []
                    var next = id
                    while let current = next, let record = records.first(where: { $0.id == current }), !out.contains(record) {
                        out.append(record)
                        next = record.parentID
                    }
                    return out
                }
                let newChain = [intermediate] + ancestors(parent).filter { $0.state == .prepared }.map(\.id)
                let shared = Set(ancestors(parent).map(\.id))
                let oldChain = ([signerID] + ancestors(records.first { $0.id == signerID }?.parentID).map(\.id)).filter { !shared.contains($0) }
                do {
                    guard try await store.switchAuthorities(activate: newChain, retire: oldChain, at: now, requester: requester) else { break }
                    // An intermediate prepared under the old parent would look like a switch back.
                    for leftover in records where leftover.kind == .intermediate && leftover.state == .prepared && leftover.id != intermediate {
                        if try await store.transitionAuthority(id: leftover.id, from: .prepared, to: .removed, at: now, requester: requester,
                                                               detail: "prepared under the previous chain; never used") {
                            unlink(directory.keyPath(authorityID: leftover.id))
                        }
                    }
                } catch {
                    throw CAError(.store, error.message)
                }
                try await reload()
                logger.info("switched to the new chain: every agent confirmed the bundle", metadata: ["authority": "\(parent)", "intermediate": "\(intermediate)"])
            case .remove(let id):
                try await remove(id, requester: requester, detail: "nothing it signed is live any more")
                try await writeBundleFile()
            }
        }
        if let deferred { throw deferred }
        return steps
    }

    static func openStore(_ directory: DataDirectory) throws(CAError) -> SQLiteDatastore {
        do {
            return try SQLiteDatastore(path: directory.databasePath)
        } catch {
            throw CAError(.store, error.message)
        }
    }

    static func loadState(_ store: any Datastore, _ directory: DataDirectory) async throws(CAError) -> (TrustDomain, [AuthorityRecord]) {
        do {
            guard let name = try await store.trustDomain() else {
                throw CAError(.notInitialized, "no CA in '\(directory.path)': run 'sigil ca init --trust-domain <td> --data-dir \(directory.path)' first")
            }
            let td: TrustDomain
            do { td = try TrustDomain(name) } catch { throw CAError(.store, "stored trust domain is invalid: \(error.message)") }
            return (td, try await store.authorities())
        } catch let error as CAError {
            throw error
        } catch let error as StoreError {
            throw CAError(.store, error.message)
        } catch {
            throw CAError(.store, "\(error)")
        }
    }

    static func parse(_ record: AuthorityRecord) throws(CAError) -> Certificate {
        do {
            return try Certificate(pemEncoded: record.certificatePEM)
        } catch {
            throw CAError(.store, "stored certificate of authority \(record.id) cannot be parsed: \(error)")
        }
    }

    // MARK: signing

    /// Signs one SVID. The store row is written before the chain is returned.
    public func sign(_ request: SigningRequest, profile: SVIDProfile, requester: String) async throws(CAError) -> IssuedSVID {
        let results = await signBatch([(request, profile)], requester: requester)
        return try results[0].get()
    }

    /// Signs a batch, committing every issued row in one transaction. Each request succeeds or fails
    /// on its own checks; if the store write fails, every request of the batch fails with it.
    public func signBatch(_ requests: [(SigningRequest, SVIDProfile)], requester: String) async -> [Result<IssuedSVID, CAError>] {
        let now = clock.now
        var results: [Result<IssuedSVID, CAError>] = []
        results.reserveCapacity(requests.count)
        var rows: [IssuedCertificate] = []
        for (request, profile) in requests {
            do throws(SigilError) {
                guard profile.spiffeID.trustDomain == trustDomain else {
                    throw SigilError(.invalidSpiffeID, "'\(profile.spiffeID)' is not in trust domain '\(trustDomain)', the only one this CA signs for")
                }
                let leaf = try profile.encodeLeaf(publicKey: request.publicKey, issuer: signer, now: now)
                let row = IssuedCertificate(
                    serial: leaf.serialHex, spiffeID: profile.spiffeID.description, authorityID: signerID,
                    notBefore: leaf.notBefore, notAfter: leaf.notAfter, issuedAt: now, requester: requester,
                    sha256: hex(SHA256.hash(data: leaf.der)))
                rows.append(row)
                results.append(.success(IssuedSVID(chainDER: [leaf.der] + chainTailDER, record: row)))
            } catch {
                results.append(.failure(CAError(.policy, error.message)))
            }
        }
        do {
            try await store.recordIssued(rows)
        } catch {
            let failure = CAError(.store, "the certificates were signed but could not be recorded, so none is handed out: \(error.message)")
            return results.map { r in r.flatMap { _ in .failure(failure) } }
        }
        for case .success(let svid) in results where logger.logLevel <= .debug {
            logger.debug("issued X509-SVID", metadata: ["spiffe_id": "\(svid.record.spiffeID)", "serial": "\(svid.record.serial)", "requester": "\(requester)"])
        }
        return results
    }

    // MARK: reading

    /// The current trust bundle (every bundle authority not removed).
    public func bundle() async throws(CAError) -> TrustBundle {
        try await CertificateAuthority.bundle(store: store, directory: directory)
    }

    static func bundle(store: any Datastore, directory: DataDirectory) async throws(CAError) -> TrustBundle {
        let (td, records) = try await loadState(store, directory)
        var certificates: [Certificate] = []
        for record in records where record.inBundle && record.state != .removed {
            certificates.append(try parse(record))
        }
        let sequence: UInt64
        do { sequence = try await store.bundleSequence() } catch { throw CAError(.store, error.message) }
        do {
            return try TrustBundle(trustDomain: td, authorities: certificates, sequenceNumber: sequence, refreshHint: .seconds(300))
        } catch {
            throw CAError(.store, error.message)
        }
    }

    /// Every authority with its issuance count.
    public func status() async throws(CAError) -> [AuthorityStatus] {
        try await CertificateAuthority.status(store: store, directory: directory)
    }

    static func status(store: any Datastore, directory: DataDirectory) async throws(CAError) -> [AuthorityStatus] {
        let (_, records) = try await loadState(store, directory)
        let counts: [String: Int]
        let usage: [String: AuthorityUsage]
        do {
            counts = try await store.issuedCounts()
            usage = try await store.authorityUsage(now: Date(), inService: true)
        } catch {
            throw CAError(.store, error.message)
        }
        // What chains to an authority: its own SVIDs and those of every authority under it.
        func below(_ id: String, depth: Int = 0) -> [String] {
            guard depth < 8 else { return [] }
            return records.filter { $0.parentID == id }.flatMap { [$0.id] + below($0.id, depth: depth + 1) }
        }
        var out: [AuthorityStatus] = []
        for record in records {
            let subject = (try? Certificate(pemEncoded: record.certificatePEM)).map { "\($0.subject)" } ?? "?"
            let chained = [record.id] + below(record.id)
            out.append(AuthorityStatus(record: record, issuedCount: counts[record.id] ?? 0, subject: subject,
                                       live: chained.reduce(0) { $0 + (usage[$1]?.live ?? 0) },
                                       lastExpiry: chained.compactMap { usage[$0]?.lastExpiry }.max()))
        }
        return out
    }

    /// The readiness gate without loading any key: live agents that have not confirmed the
    /// current bundle, and the tainted authorities.
    public static func readiness(_ directory: DataDirectory, now: Date = Date()) async throws(CAError) -> (unconfirmed: [AgentRecord], tainted: [String]) {
        let store = try openStore(directory)
        do {
            return (try await store.unconfirmedAgents(sequence: try await store.bundleSequence(), now: now), try await store.taintedAuthorities())
        } catch {
            throw CAError(.store, error.message)
        }
    }

    /// Reads bundle and status without loading any private key (for `bundle show`, `ca status`).
    public static func inspect(_ directory: DataDirectory) async throws(CAError) -> (TrustBundle, [AuthorityStatus]) {
        guard access(directory.databasePath, F_OK) == 0 else {
            if errno == EACCES {
                throw CAError(.dataDirectory, "cannot read '\(directory.databasePath)': permission denied (run as the user that owns '\(directory.path)')")
            }
            throw CAError(.notInitialized, "no CA in '\(directory.path)': run 'sigil ca init --trust-domain <td> --data-dir \(directory.path)' first")
        }
        let store = try openStore(directory)
        return (try await bundle(store: store, directory: directory), try await status(store: store, directory: directory))
    }

    /// The JWT-SVID signing keys of the CA in `directory`: its `keys/jwt-<kid>.key.pem` files
    /// (0600; the server makes one on its first start), by file name.
    public static func jwtSigningKeys(_ directory: DataDirectory) throws(CAError) -> [JWTSigningKey] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: directory.keysPath)) ?? []).sorted()
        var keys: [JWTSigningKey] = []
        for name in names where name.hasPrefix("jwt-") && name.hasSuffix(".key.pem") {
            let path = directory.keysPath + "/" + name
            _ = try KeyFiles.read(path)  // checks the file's mode
            guard let data = FileManager.default.contents(atPath: path),
                  let key = try? P256.Signing.PrivateKey(pemRepresentation: String(decoding: data, as: UTF8.self)) else {
                throw CAError(.keyFile, "JWT signing key '\(path)' is not a P-256 PEM private key")
            }
            do {
                keys.append(try JWTSigningKey(privateKey: key, keyID: String(name.dropFirst(4).dropLast(8))))
            } catch {
                throw CAError(.keyFile, "JWT signing key '\(path)': \(error.message)")
            }
        }
        return keys
    }

    /// The JWT-SVID verification keys of the CA in `directory` (the public halves of
    /// ``jwtSigningKeys(_:)``).
    public static func jwtBundle(_ directory: DataDirectory, trustDomain: TrustDomain) throws(CAError) -> JWTBundle {
        var bundle = JWTBundle(trustDomain: trustDomain)
        for key in try jwtSigningKeys(directory) {
            do { try bundle.add(key) } catch { throw CAError(.keyFile, "JWT signing key \(key.keyID): \(error.message)") }
        }
        return bundle
    }
}


