public import NIOCore
public import NIOSSL
import X509
public import SigilCore
import SwiftASN1

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
            let chain: [Certificate]
            do {
                chain = try nioChain.map { try Certificate(derEncoded: $0.toDERBytes()) }
            } catch {
                promise.succeed(.failed)
                return
            }
            if allowBootstrap, chain.count == 1, chain[0].uriSANs.isEmpty, chain[0].issuer == chain[0].subject,
               chain[0].publicKey.isValidSignature(chain[0].signature, for: chain[0]) {
                promise.succeed(.certificateVerified(VerificationMetadata(nil)))
                return
            }
            guard let current = bundle() else {
                promise.succeed(.failed)
                return
            }
            promise.completeWithTask {
                do {
                    let id = try await SpiffeVerifier(bundle: current).verify(chain: chain)
                    if let expectedPeer, id != expectedPeer { return .failed }
                    return .certificateVerified(VerificationMetadata(NIOSSL.ValidatedCertificateChain(nioChain)))
                } catch {
                    return .failed
                }
            }
        }
    }
}
