public import SigilCore
public import SigilStore
@_spi(FixedExpiryValidationTime) import X509
import SwiftASN1
import Crypto
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What `sigil ca init` made.
public struct CAInitSummary: Sendable {
    public let trustDomain: TrustDomain
    public let directory: DataDirectory
    public let authorities: [AuthorityRecord]
    public let bundle: TrustBundle
    /// Where a replaced CA was moved with `--force`, if any.
    public let replacedTo: String?
}

extension CertificateAuthority {
    /// Creates a CA in `directory`: a self-signed root and an intermediate signing CA, or, with an
    /// upstream CA, an intermediate chained to it. Refuses to touch an existing CA unless
    /// `options.force`, in which case the old CA is moved aside (never deleted). If any step fails,
    /// nothing of the new CA is left behind.
    public static func initialize(_ directory: DataDirectory, options: CAInitOptions, clock: any SigilClock = SystemClock()) async throws(CAError) -> CAInitSummary {
        let now = clock.now
        try KeyFiles.ensurePrivateDirectory(directory.path)
        // One initializer at a time per directory: a second `ca init` waits, then finds the CA.
        let lock = try DirectoryLock(directory.path + "/.init.lock")
        defer { lock.release() }
        var replacedTo: String?
        if directory.holdsCA, !options.force {
            let store = FileManager.default.fileExists(atPath: directory.databasePath) ? try? SQLiteDatastore(path: directory.databasePath) : nil
            let td: String?? = try? await store?.trustDomain()
            throw CAError(.alreadyInitialized, "a CA already exists in '\(directory.path)'\((td ?? nil).map { " (trust domain \($0))" } ?? ""); refusing to overwrite it. Pass --force to move it aside and create a new one")
        }

        // 1. Build every key and certificate in memory.
        var records: [AuthorityRecord] = []
        var keys: [(String, Certificate.PrivateKey)] = []
        let td = options.trustDomain
        func record(_ cert: Certificate, kind: AuthorityKind, parent: String?, inBundle: Bool) -> AuthorityRecord {
            AuthorityRecord(id: cert.authorityID, kind: kind, state: .active, parentID: parent, notBefore: cert.notValidBefore,
                            notAfter: cert.notValidAfter, fingerprint: cert.sha256Fingerprint, certificatePEM: cert.pemString,
                            inBundle: inBundle, createdAt: now)
        }
        let intermediateKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
        if let upstream = options.upstream {
            try await checkUpstream(upstream, trustDomain: td, now: now)
        }
        var upstreamIntermediate: Certificate?
        do throws(SigilError) {
            let intermediateProfile = try CAProfile(trustDomain: td, ttl: options.caTTL, commonName: "Sigil Intermediate CA \(td)", maxPathLength: 0)
            if let upstream = options.upstream {
                let issuer = try SigningAuthority(certificate: upstream.chain[0], privateKey: upstream.key)
                let intermediate = try intermediateProfile.makeIntermediate(publicKey: intermediateKey.publicKey, issuer: issuer, now: now)
                var all = upstream.roots.map { ($0, true) }
                for cert in upstream.chain where !upstream.roots.contains(cert) { all.append((cert, false)) }
                for (cert, inBundle) in all {
                    // Parent: the next certificate of the upstream chain, or the root that issued it.
                    let parent = all.first { $0.0 != cert && $0.0.subject == cert.issuer }?.0.authorityID
                    records.append(record(cert, kind: .upstream, parent: cert.issuer == cert.subject ? nil : parent, inBundle: inBundle))
                }
                records.append(record(intermediate, kind: .intermediate, parent: upstream.chain[0].authorityID, inBundle: false))
                upstreamIntermediate = intermediate
            } else {
                let rootKey = Certificate.PrivateKey(P256.Signing.PrivateKey())
                let rootProfile = try CAProfile(trustDomain: td, ttl: options.rootTTL, commonName: "Sigil Root CA \(td)", maxPathLength: 1)
                let root = try rootProfile.makeRoot(key: rootKey, now: now)
                let rootAuthority = try SigningAuthority(certificate: root, privateKey: rootKey)
                let intermediate = try intermediateProfile.makeIntermediate(publicKey: intermediateKey.publicKey, issuer: rootAuthority, now: now)
                records.append(record(root, kind: .root, parent: nil, inBundle: true))
                records.append(record(intermediate, kind: .intermediate, parent: root.authorityID, inBundle: false))
                keys.append((root.authorityID, rootKey))
            }
        } catch {
            throw CAError(.invalidUpstream, error.message)
        }
        keys.append((records.last!.id, intermediateKey))
        if let upstream = options.upstream, let upstreamIntermediate {
            try await checkIssuedUnder(upstream, intermediate: upstreamIntermediate, key: intermediateKey, trustDomain: td, now: now)
        }
        // Everything is checked: only now is an existing CA (--force) moved aside.
        if directory.holdsCA { replacedTo = try moveAside(directory, now: now) }

        // 2. Keys to disk (0600 in 0700), then 3. the store in one transaction; undo on failure.
        try KeyFiles.ensurePrivateDirectory(directory.keysPath)
        var written: [String] = []
        let databaseExisted = FileManager.default.fileExists(atPath: directory.databasePath)
        do throws(CAError) {
            for (id, key) in keys {
                let path = directory.keyPath(authorityID: id)
                try KeyFiles.write(key, to: path)
                written.append(path)
            }
            let store = try openStore(directory)
            do {
                try await store.initialize(trustDomain: td.name, authorities: records, at: now)
            } catch {
                throw CAError(.store, error.message)
            }
            let bundle = try await CertificateAuthority.bundle(store: store, directory: directory)
            try KeyFiles.writeAtomically(Array(bundle.pemEncoded.utf8), to: directory.bundlePEMPath, mode: 0o644)
            return CAInitSummary(trustDomain: td, directory: directory, authorities: records, bundle: bundle, replacedTo: replacedTo)
        } catch {
            for path in written { unlink(path) }
            if !databaseExisted {
                for suffix in ["", "-wal", "-shm"] { unlink(directory.databasePath + suffix) }
            }
            // The CA that --force moved aside goes back where it was.
            if let replacedTo {
                unlink(directory.bundlePEMPath)
                rmdir(directory.keysPath)  // empty again: the new keys were removed above
                var restored = true
                for name in movedNames where FileManager.default.fileExists(atPath: replacedTo + "/" + name) {
                    if rename(replacedTo + "/" + name, directory.path + "/" + name) != 0 { restored = false }
                }
                if restored { rmdir(replacedTo) }
                throw CAError(error.code, error.message + (restored ? " (the previous CA is back in place)"
                                                                    : " (the previous CA is in '\(replacedTo)'; move its files back)"))
            }
            throw error
        }
    }

    /// What a CA's data directory holds, moved aside by `--force`.
    static let movedNames = ["sigil.db", "sigil.db-wal", "sigil.db-shm", "keys", "bundle.pem"]

    /// Moves the files of an existing CA into a new `replaced-<time>[-N]/` inside the data
    /// directory: always a directory of its own (created here, never an earlier one reused), so a
    /// second `--force` in the same second cannot overwrite what the first put aside.
    static func moveAside(_ directory: DataDirectory, now: Date) throws(CAError) -> String {
        let stamp = Int(now.timeIntervalSince1970)
        var target = directory.path + "/replaced-\(stamp)"
        var attempt = 1
        while mkdir(target, 0o700) != 0 {
            guard errno == EEXIST, attempt < 1000 else {
                throw CAError(.dataDirectory, "cannot create '\(target)' to move the old CA aside: \(String(cString: strerror(errno)))")
            }
            attempt += 1
            target = directory.path + "/replaced-\(stamp)-\(attempt)"
        }
        for name in movedNames {
            let from = directory.path + "/" + name
            guard FileManager.default.fileExists(atPath: from) else { continue }
            guard rename(from, target + "/" + name) == 0 else {
                throw CAError(.dataDirectory, "cannot move '\(from)' aside to '\(target)': \(String(cString: strerror(errno)))")
            }
        }
        return target
    }

    /// An SVID issued under the new intermediate must validate up to an upstream root by RFC 5280
    /// path validation (as every peer will check it): a path length or name constraint above the
    /// upstream certificate that excludes Sigil's intermediate or its SVIDs is found here, before
    /// anything is written, not when the first agent cannot attest.
    static func checkIssuedUnder(_ upstream: UpstreamCA, intermediate: Certificate, key: Certificate.PrivateKey,
                                 trustDomain: TrustDomain, now: Date) async throws(CAError) {
        let probe: Certificate
        do throws(SigilError) {
            let authority = try SigningAuthority(certificate: intermediate, privateKey: key)
            let profile = try SVIDProfile(spiffeID: SpiffeID("spiffe://\(trustDomain.name)/ns/default/sa/probe"), ttl: .seconds(600))
            probe = try profile.makeCertificate(publicKey: Certificate.PrivateKey(P256.Signing.PrivateKey()).publicKey, issuer: authority, now: now)
        } catch {
            throw CAError(.invalidUpstream, "cannot issue a test SVID under the new intermediate: \(error.message)")
        }
        var verifier = Verifier(rootCertificates: CertificateStore(upstream.roots)) {
            RFC5280Policy(fixedExpiryValidationTime: now)
        }
        let result = await verifier.validate(leaf: probe, intermediates: CertificateStore([intermediate] + upstream.chain))
        if case .couldNotValidate(let failures) = result {
            let reason = failures.first.map { "\($0.policyFailureReason)" } ?? "no path to a root"
            throw CAError(.invalidUpstream, "SVIDs issued under this upstream would not validate (RFC 5280 path validation, as every peer checks them): \(reason); check the path length and name constraints of the upstream chain")
        }
    }

    /// The upstream signing certificate must be a CA that may sign an intermediate, be valid now,
    /// belong to no other SPIFFE trust domain, and chain to the upstream roots.
    static func checkUpstream(_ upstream: UpstreamCA, trustDomain: TrustDomain, now: Date) async throws(CAError) {
        let cert = upstream.chain[0]
        guard cert.notValidBefore <= now, cert.notValidAfter > now else {
            throw CAError(.invalidUpstream, "--upstream-cert '\(cert.subject)' is not valid now (valid \(cert.notValidBefore) to \(cert.notValidAfter))")
        }
        for uri in cert.uriSANs {
            if let id = try? SpiffeID(uri), id.trustDomain != trustDomain {
                throw CAError(.invalidUpstream, "--upstream-cert belongs to SPIFFE trust domain '\(id.trustDomain)', not '\(trustDomain)'")
            }
        }
        var verifier = Verifier(rootCertificates: CertificateStore(upstream.roots)) {
            RFC5280Policy(fixedExpiryValidationTime: now)
        }
        let result = await verifier.validate(leaf: cert, intermediates: CertificateStore(Array(upstream.chain.dropFirst())))
        if case .couldNotValidate(let failures) = result {
            let reason = failures.first.map { "\($0.policyFailureReason)" } ?? "no path to a root"
            throw CAError(.invalidUpstream, "--upstream-cert does not chain to the upstream root(s): \(reason)")
        }
    }
}

/// An exclusive advisory lock (flock) on a file, held until ``release()``.
final class DirectoryLock {
    private var fd: Int32

    init(_ path: String) throws(CAError) {
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw CAError(.dataDirectory, "cannot create lock file '\(path)': \(String(cString: strerror(errno)))")
        }
        while flock(fd, LOCK_EX) != 0 {
            if errno == EINTR { continue }
            let message = String(cString: strerror(errno))
            close(fd)
            throw CAError(.dataDirectory, "cannot lock '\(path)': \(message)")
        }
    }

    func release() {
        guard fd >= 0 else { return }
        flock(fd, LOCK_UN)
        close(fd)
        fd = -1
    }
}
