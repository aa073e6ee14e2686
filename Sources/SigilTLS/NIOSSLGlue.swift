public import NIOCore
public import NIOSSL
import Crypto
import X509
public import SigilCore
import SwiftASN1
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The NIOSSL end of SPIFFE verification: a custom verification callback that replaces
/// BoringSSL's chain check with ``SpiffeVerifier`` over the *current* bundle (read per handshake,
/// so a bundle change applies to the next connection without a restart).
public enum SpiffeTLS {
    /// - Parameters:
    ///   - bundle: read on every handshake.
    ///   - allowBootstrap: also accept a lone self-signed certificate without any URI SAN: a node
    ///     that has no SVID yet proves possession of its key and nothing else (used for node
    ///     attestation; the handler must treat such a peer as unauthenticated).
    ///   - expectedPeer: if set, the peer's SPIFFE ID must be exactly this.
    public static func verificationCallback(
        bundle: @escaping @Sendable () -> TrustBundle?,
        allowBootstrap: Bool = false,
        expectedPeer: SpiffeID? = nil
    ) -> @Sendable ([NIOSSLCertificate], EventLoopPromise<NIOSSLVerificationResultWithMetadata>) -> Void {
        { nioChain, promise in
            guard let ders = try? nioChain.map({ try $0.toDERBytes() }) else {
                promise.succeed(.failed)
                return
            }
            let current = bundle()
            // The same chain under the same bundle, still inside its validity: the earlier verdict
            // stands, decided here on the event loop (no parsing, no chain building, no signature
            // checks).
            let key = VerifiedChains.key(ders)
            let now = Date()
            if let current, let id = VerifiedChains.shared.lookup(key, bundle: current, now: now) {
                if let expectedPeer, id != expectedPeer {
                    promise.succeed(.failed)
                } else {
                    promise.succeed(.certificateVerified(VerificationMetadata(NIOSSL.ValidatedCertificateChain(nioChain))))
                }
                return
            }
            guard let chain = try? ders.map({ try Certificate(derEncoded: $0) }) else {
                promise.succeed(.failed)
                return
            }
            if allowBootstrap, chain.count == 1, chain[0].uriSANs.isEmpty, chain[0].issuer == chain[0].subject,
               chain[0].publicKey.isValidSignature(chain[0].signature, for: chain[0]) {
                promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                return
            }
            guard let current else {
                promise.succeed(.failed)
                return
            }
            promise.completeWithTask {
                do {
                    let id = try await SpiffeVerifier(bundle: current).verify(chain: chain, now: now)
                    VerifiedChains.shared.store(key, chain: chain, bundle: current, id: id)
                    if let expectedPeer, id != expectedPeer { return .failed }
                    return .certificateVerified(VerificationMetadata(NIOSSL.ValidatedCertificateChain(nioChain)))
                } catch {
                    return .failed
                }
            }
        }
    }
}

/// Chains that passed ``SpiffeVerifier``, by their exact bytes. A workload opens many connections
/// with one SVID, so most handshakes present a chain already verified: looking it up replaces
/// parsing, chain building and two or more ECDSA verifications. An entry counts only for the very
/// bundle it was verified against (any bundle change, such as a CA removed or revoked, misses)
/// and only inside the validity window shared by every certificate of the chain. Failures are
/// never cached. The handshake's own proof of key possession (CertificateVerify) is BoringSSL's
/// and happens on every connection either way.
final class VerifiedChains: Sendable {
    struct Entry {
        let bundle: TrustBundle
        let id: SpiffeID
        let notBefore: Date
        let notAfter: Date
    }

    static let shared = VerifiedChains()
    /// Entries kept before the table is emptied (each a few hundred bytes).
    private let entries = DigestTable<Entry>(capacity: 4096)

    /// The SHA-256 of the chain's certificates, each prefixed with its length.
    static func key(_ ders: [[UInt8]]) -> SHA256Digest {
        var hasher = SHA256()
        for der in ders {
            var length = UInt32(truncatingIfNeeded: der.count).bigEndian
            withUnsafeBytes(of: &length) { hasher.update(bufferPointer: $0) }
            hasher.update(data: der)
        }
        return hasher.finalize()
    }

    func lookup(_ key: SHA256Digest, bundle: TrustBundle, now: Date) -> SpiffeID? {
        guard let entry = entries[key] else { return nil }
        guard now >= entry.notBefore, now <= entry.notAfter, entry.bundle == bundle else { return nil }
        return entry.id
    }

    func store(_ key: SHA256Digest, chain: [Certificate], bundle: TrustBundle, id: SpiffeID) {
        // The window every certificate involved shares: the presented chain and (conservatively)
        // every authority of the bundle, so an expired root ends the entry even while it is listed.
        let involved = chain + bundle.authorities
        guard let notBefore = involved.map(\.notValidBefore).max(), let notAfter = involved.map(\.notValidAfter).min() else { return }
        entries.insert(Entry(bundle: bundle, id: id, notBefore: notBefore, notAfter: notAfter), for: key)
    }
}
