public import X509
public import SigilCore
public import SwiftASN1
#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// The SPIFFE rules on a presented X509-SVID chain, as a swift-certificates policy: the leaf has
/// exactly one URI SAN holding a SPIFFE ID with a path, in the expected trust domain; the leaf is
/// not a CA and has a keyUsage extension with digitalSignature (and neither keyCertSign nor
/// cRLSign); every CA above it is a CA.
public struct SpiffeX509Policy: VerifierPolicy, Sendable {
    public let trustDomain: TrustDomain
    /// The SAN may be critical (required when a subject is empty): this policy is what enforces it.
    public let verifyingCriticalExtensions: [ASN1ObjectIdentifier] = [.X509ExtensionID.subjectAlternativeName]

    public init(trustDomain: TrustDomain) {
        self.trustDomain = trustDomain
    }

    public mutating func chainMeetsPolicyRequirements(chain: UnverifiedCertificateChain) async -> PolicyEvaluationResult {
        let leaf = chain.leaf
        let uris = leaf.uriSANs
        guard uris.count == 1 else {
            return .failsToMeetPolicy(reason: "X509-SVID must have exactly one URI SAN, found \(uris.count)")
        }
        guard let id = try? SpiffeID(uris[0]), !id.isTrustDomainID else {
            return .failsToMeetPolicy(reason: "X509-SVID URI SAN '\(uris[0])' is not a SPIFFE ID with a path")
        }
        let expected = trustDomain
        guard id.trustDomain == expected else {
            return .failsToMeetPolicy(reason: "X509-SVID is from trust domain '\(id.trustDomain)', expected '\(expected)'")
        }
        if leaf.isCertificateAuthority {
            return .failsToMeetPolicy(reason: "X509-SVID leaf is a CA certificate")
        }
        // X509-SVID §4.3: the key usage extension MUST be set on every SVID (go-spiffe refuses a
        // leaf without digitalSignature, so without the extension, too).
        guard let ku = try? leaf.extensions.keyUsage, ku.digitalSignature, !ku.keyCertSign, !ku.cRLSign else {
            return .failsToMeetPolicy(reason: "X509-SVID leaf must have a keyUsage extension with digitalSignature and without keyCertSign/cRLSign")
        }
        return .meetsPolicy
    }
}

/// Verifies SPIFFE peers against a trust bundle.
public struct SpiffeVerifier: Sendable {
    public let bundle: TrustBundle

    public init(bundle: TrustBundle) {
        self.bundle = bundle
    }

    /// The peer's SPIFFE ID if `chain` (leaf first) validates to the bundle under the SPIFFE rules.
    public func verify(chain: [Certificate], now: Date = Date()) async throws(SigilError) -> SpiffeID {
        guard let leaf = chain.first else {
            throw SigilError(.invalidCertificate, "the peer presented no certificate")
        }
        var verifier = Verifier(rootCertificates: CertificateStore(bundle.authorities)) {
            RFC5280Policy()
            SpiffeX509Policy(trustDomain: bundle.trustDomain)
        }
        let result = await verifier.validate(leaf: leaf, intermediates: CertificateStore(Array(chain.dropFirst())))
        switch result {
        case .validCertificate:
            guard let id = leaf.spiffeID else {
                throw SigilError(.invalidCertificate, "the peer certificate has no SPIFFE ID")
            }
            return id
        case .couldNotValidate(let failures):
            let reason = failures.first.map { "\($0.policyFailureReason)" } ?? "no chain to the trust bundle"
            throw SigilError(.invalidCertificate, "peer certificate rejected: \(reason)")
        }
    }
}
