public import X509
import SwiftASN1
import Crypto
#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// The authority that signs: its certificate and private key.
public struct SigningAuthority: Sendable {
    public let certificate: Certificate
    public let privateKey: Certificate.PrivateKey
    /// The trust domain named by the authority's URI SAN (`spiffe://td`), if it carries one.
    public let trustDomain: TrustDomain?
    let signatureAlgorithm: Certificate.SignatureAlgorithm
    let authorityKeyIdentifier: AuthorityKeyIdentifier
    let authorityKeyIdentifierExtension: Certificate.Extension
    let authorityKeyIdentifierDER: [UInt8]
    let subjectDER: [UInt8]
    let signatureAlgorithmDER: [UInt8]
    /// The issuer key as swift-crypto's own type when it is P-256: signing with it directly skips
    /// a parse and re-encode of every signature.
    let p256Key: P256.Signing.PrivateKey?
    let mayIssue: Bool

    public init(certificate: Certificate, privateKey: Certificate.PrivateKey) throws(SigilError) {
        guard certificate.publicKey == privateKey.publicKey else {
            throw SigilError(.invalidCertificate, "the private key does not belong to the certificate '\(certificate.subject)'")
        }
        self.certificate = certificate
        self.privateKey = privateKey
        // Everything a signature needs from the issuer is worked out once, not per certificate.
        self.trustDomain = certificate.uriSANs.lazy.compactMap { try? SpiffeID($0).trustDomain }.first
        self.signatureAlgorithm = try privateKey.sigilSignatureAlgorithm
        let ski = (try? certificate.extensions.subjectKeyIdentifier)?.keyIdentifier
            ?? SubjectKeyIdentifier(hash: certificate.publicKey).keyIdentifier
        self.authorityKeyIdentifier = AuthorityKeyIdentifier(keyIdentifier: ski)
        do {
            self.authorityKeyIdentifierExtension = try Certificate.Extension(authorityKeyIdentifier, critical: false)
        } catch {
            throw SigilError(.invalidCertificate, "cannot encode the authority key identifier of '\(certificate.subject)': \(error)")
        }
        self.authorityKeyIdentifierDER = DERWriter.extensionDER(authorityKeyIdentifierExtension)
        var serializer = DER.Serializer()
        do {
            try serializer.serialize(certificate.subject)
        } catch {
            throw SigilError(.invalidCertificate, "cannot encode the subject of '\(certificate.subject)': \(error)")
        }
        self.subjectDER = serializer.serializedBytes
        switch signatureAlgorithm {
        case .ecdsaWithSHA256: signatureAlgorithmDER = [0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]
        case .ecdsaWithSHA384: signatureAlgorithmDER = [0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]
        default: signatureAlgorithmDER = [0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00]
        }
        if signatureAlgorithm == .ecdsaWithSHA256, let pem = try? privateKey.serializeAsPEM().pemString {
            self.p256Key = try? P256.Signing.PrivateKey(pemRepresentation: pem)
        } else {
            self.p256Key = nil
        }
        let keyUsage = try? certificate.extensions.keyUsage
        self.mayIssue = certificate.isCertificateAuthority && (keyUsage?.keyCertSign ?? true)
    }

    func checkCanSign(at now: Date) throws(SigilError) {
        guard mayIssue else {
            throw SigilError(.invalidCertificate, "'\(certificate.subject)' is not a CA certificate with keyCertSign (basicConstraints cA true); it cannot sign")
        }
        guard certificate.notValidAfter > now else {
            throw SigilError(.invalidCertificate, "the signing CA '\(certificate.subject)' expired at \(certificate.notValidAfter); rotate it (sigil ca rotate) before signing, or, if the root has expired too (sigil ca status), see docs/operations.md, \"Root expiry\"")
        }
        guard certificate.notValidBefore <= now else {
            throw SigilError(.invalidCertificate, "the signing CA '\(certificate.subject)' is not valid before \(certificate.notValidBefore)")
        }
    }
}

/// How Sigil shapes an X509-SVID leaf, following every MUST of the SPIFFE X509-SVID spec:
///
/// - exactly one URI SAN, the SPIFFE ID (which must have a path: a leaf never carries a bare trust domain ID);
/// - basicConstraints critical, cA=false;
/// - keyUsage critical with digitalSignature (plus keyEncipherment for RSA keys only), never keyCertSign/cRLSign;
/// - extendedKeyUsage serverAuth + clientAuth;
/// - a random 128-bit serial; notBefore backdated by ``clockSkew``; notAfter clamped to the issuer's notAfter.
///
/// Nothing is taken from a CSR but its public key: the caller passes only that.
public struct SVIDProfile: Sendable {
    public static let defaultTTL: Duration = .seconds(3600)
    public static let minimumTTL: Duration = .seconds(10)
    /// How far notBefore is set in the past, so peers with a slightly slow clock accept a new SVID.
    public static let defaultClockSkew: Duration = .seconds(30)

    public let spiffeID: SpiffeID
    public let ttl: Duration
    public let dnsNames: [String]
    public let clockSkew: Duration
    public let keyPolicy: KeyPolicy
    /// The parts of every leaf of this profile that do not depend on the key, encoded once.
    let fixedExtensions: [Certificate.Extension]
    let ecKeyUsage: Certificate.Extension
    let rsaKeyUsage: Certificate.Extension
    let subject: DistinguishedName
    let fixedExtensionDER: [[UInt8]]
    let ecKeyUsageDER: [UInt8]
    let rsaKeyUsageDER: [UInt8]
    let subjectDER: [UInt8]

    public init(
        spiffeID: SpiffeID,
        ttl: Duration = SVIDProfile.defaultTTL,
        dnsNames: [String] = [],
        clockSkew: Duration = SVIDProfile.defaultClockSkew,
        keyPolicy: KeyPolicy = .default
    ) throws(SigilError) {
        guard !spiffeID.isTrustDomainID else {
            throw SigilError(.invalidSpiffeID, "'\(spiffeID)' has no path; an X509-SVID leaf needs a workload ID such as \(spiffeID)/ns/default/sa/web")
        }
        guard ttl >= SVIDProfile.minimumTTL else {
            throw SigilError(.invalidArgument, "TTL \(DurationText.format(ttl)) is too short; the minimum is \(DurationText.format(SVIDProfile.minimumTTL))")
        }
        for name in dnsNames { try DNSName.validate(name) }
        self.spiffeID = spiffeID
        self.ttl = ttl
        self.dnsNames = dnsNames
        self.clockSkew = clockSkew
        self.keyPolicy = keyPolicy
        let sans: [GeneralName] = [.uniformResourceIdentifier(spiffeID.description)] + dnsNames.map { .dnsName($0) }
        do {
            self.fixedExtensions = [
                try Certificate.Extension(BasicConstraints.notCertificateAuthority, critical: true),
                try Certificate.Extension(try ExtendedKeyUsage([.serverAuth, .clientAuth]), critical: false),
                try Certificate.Extension(SubjectAlternativeNames(sans), critical: false),
            ]
            self.ecKeyUsage = try Certificate.Extension(KeyUsage(digitalSignature: true), critical: true)
            self.rsaKeyUsage = try Certificate.Extension(KeyUsage(digitalSignature: true, keyEncipherment: true), critical: true)
            self.subject = try DistinguishedName {
                OrganizationName("Sigil")
                // RFC 5280's upper bound for a CN is 64 characters: the first DNS name that fits
                // (the SAN carries every name anyway).
                if let name = dnsNames.first(where: { $0.utf8.count <= 64 }) { CommonName(name) }
            }
            var serializer = DER.Serializer()
            try serializer.serialize(subject)
            self.subjectDER = serializer.serializedBytes
        } catch {
            throw SigilError(.invalidArgument, "cannot encode the SVID profile for \(spiffeID): \(error)")
        }
        self.fixedExtensionDER = fixedExtensions.map(DERWriter.extensionDER)
        self.ecKeyUsageDER = DERWriter.extensionDER(ecKeyUsage)
        self.rsaKeyUsageDER = DERWriter.extensionDER(rsaKeyUsage)
    }

    /// The rules every issuance checks first, whichever encoder builds the leaf: the key is
    /// acceptable, the issuer may sign now and only for this trust domain; and the validity window
    /// (notBefore backdated for clock skew, notAfter clamped to the issuer's).
    func preflight(publicKey: Certificate.PublicKey, issuer: SigningAuthority, now: Date) throws(SigilError) -> (KeyPolicy.Kind, Date, Date) {
        let kind = try keyPolicy.check(publicKey)
        try issuer.checkCanSign(at: now)
        if let td = issuer.trustDomain, td != spiffeID.trustDomain {
            throw SigilError(.invalidSpiffeID, "'\(spiffeID)' is not in trust domain '\(td)', the only one this CA signs for")
        }
        let notBefore = max(now.addingTimeInterval(-clockSkew.timeInterval), issuer.certificate.notValidBefore)
        let notAfter = min(now.addingTimeInterval(ttl.timeInterval), issuer.certificate.notValidAfter)
        return (kind, notBefore, notAfter)
    }

    /// Builds and signs the leaf for `publicKey`.
    public func makeCertificate(
        publicKey: Certificate.PublicKey,
        issuer: SigningAuthority,
        now: Date,
        serialNumber: Certificate.SerialNumber = .random128()
    ) throws(SigilError) -> Certificate {
        let (kind, notBefore, notAfter) = try preflight(publicKey: publicKey, issuer: issuer, now: now)
        let usage: Certificate.Extension
        if case .rsa = kind { usage = rsaKeyUsage } else { usage = ecKeyUsage }
        do {
            var list = fixedExtensions
            list.reserveCapacity(fixedExtensions.count + 3)
            list.insert(usage, at: 1)
            list.append(try Certificate.Extension(SubjectKeyIdentifier(hash: publicKey), critical: false))
            list.append(issuer.authorityKeyIdentifierExtension)
            let extensions = try Certificate.Extensions(list)
            return try Certificate(
                version: .v3,
                serialNumber: serialNumber,
                publicKey: publicKey,
                notValidBefore: notBefore,
                notValidAfter: notAfter,
                issuer: issuer.certificate.subject,
                subject: subject,
                signatureAlgorithm: issuer.signatureAlgorithm,
                extensions: extensions,
                issuerPrivateKey: issuer.privateKey
            )
        } catch let error as SigilError {
            throw error
        } catch {
            throw SigilError(.invalidCertificate, "could not build the X509-SVID for \(spiffeID): \(error)")
        }
    }
}

/// How Sigil shapes its CA certificates (the self-signed root and the intermediate signing CAs):
/// basicConstraints critical cA=true, keyUsage critical keyCertSign+cRLSign, and one URI SAN that is
/// the trust domain's own ID (`spiffe://td`, no path), as the X509-SVID spec describes signing certificates.
public struct CAProfile: Sendable, Hashable {
    public var trustDomain: TrustDomain
    public var ttl: Duration
    public var commonName: String
    /// The pathLenConstraint; nil for no limit.
    public var maxPathLength: Int?
    public var clockSkew: Duration

    public init(trustDomain: TrustDomain, ttl: Duration, commonName: String, maxPathLength: Int?, clockSkew: Duration = SVIDProfile.defaultClockSkew) throws(SigilError) {
        guard ttl >= .seconds(60) else {
            throw SigilError(.invalidArgument, "CA TTL \(DurationText.format(ttl)) is too short; the minimum is 1m")
        }
        self.trustDomain = trustDomain
        self.ttl = ttl
        self.commonName = commonName
        self.maxPathLength = maxPathLength
        self.clockSkew = clockSkew
    }

    /// A self-signed root for `key`.
    public func makeRoot(key: Certificate.PrivateKey, now: Date, serialNumber: Certificate.SerialNumber = .random128()) throws(SigilError) -> Certificate {
        let subject = try name()
        return try build(
            publicKey: key.publicKey, issuerName: subject, subject: subject, issuerKey: key,
            aki: AuthorityKeyIdentifier(keyIdentifier: SubjectKeyIdentifier(hash: key.publicKey).keyIdentifier),
            notBefore: now.addingTimeInterval(-clockSkew.timeInterval),
            notAfter: now.addingTimeInterval(ttl.timeInterval), serialNumber: serialNumber)
    }

    /// An intermediate for `publicKey`, signed by `issuer`; notAfter is clamped to the issuer's.
    public func makeIntermediate(publicKey: Certificate.PublicKey, issuer: SigningAuthority, now: Date, serialNumber: Certificate.SerialNumber = .random128()) throws(SigilError) -> Certificate {
        _ = try KeyPolicy.default.check(publicKey)
        try issuer.checkCanSign(at: now)
        if case .isCertificateAuthority(let limit) = (try? issuer.certificate.extensions.basicConstraints) ?? .notCertificateAuthority,
           let limit, limit < 1 {
            throw SigilError(.invalidCertificate, "'\(issuer.certificate.subject)' has pathLenConstraint \(limit); it cannot sign an intermediate CA")
        }
        return try build(
            publicKey: publicKey, issuerName: issuer.certificate.subject, subject: try name(), issuerKey: issuer.privateKey,
            aki: issuer.authorityKeyIdentifier,
            notBefore: max(now.addingTimeInterval(-clockSkew.timeInterval), issuer.certificate.notValidBefore),
            notAfter: min(now.addingTimeInterval(ttl.timeInterval), issuer.certificate.notValidAfter),
            serialNumber: serialNumber)
    }

    private func name() throws(SigilError) -> DistinguishedName {
        do {
            return try DistinguishedName {
                OrganizationName("Sigil")
                CommonName(commonName)
            }
        } catch {
            throw SigilError(.invalidArgument, "invalid CA name '\(commonName)': \(error)")
        }
    }

    private func build(
        publicKey: Certificate.PublicKey, issuerName: DistinguishedName, subject: DistinguishedName,
        issuerKey: Certificate.PrivateKey, aki: AuthorityKeyIdentifier, notBefore: Date, notAfter: Date,
        serialNumber: Certificate.SerialNumber
    ) throws(SigilError) -> Certificate {
        do {
            let extensions = try Certificate.Extensions {
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: maxPathLength))
                Critical(KeyUsage(keyCertSign: true, cRLSign: true))
                SubjectKeyIdentifier(hash: publicKey)
                aki
                SubjectAlternativeNames([.uniformResourceIdentifier(trustDomain.id.description)])
            }
            return try Certificate(
                version: .v3, serialNumber: serialNumber, publicKey: publicKey,
                notValidBefore: notBefore, notValidAfter: notAfter,
                issuer: issuerName, subject: subject,
                signatureAlgorithm: try issuerKey.sigilSignatureAlgorithm,
                extensions: extensions, issuerPrivateKey: issuerKey)
        } catch let error as SigilError {
            throw error
        } catch {
            throw SigilError(.invalidCertificate, "could not build CA certificate '\(commonName)': \(error)")
        }
    }
}

/// DNS names for an SVID's extra SANs (RFC 1123 labels; a leading `*.` wildcard allowed).
public enum DNSName {
    public static func validate(_ name: String) throws(SigilError) {
        let bytes = Array(name.utf8)
        guard !bytes.isEmpty, bytes.count <= 253 else {
            throw SigilError(.invalidArgument, "DNS name '\(name)' must be 1 to 253 characters long")
        }
        if name.allSatisfy({ $0.isNumber || $0 == "." }) || name.contains(":") {
            throw SigilError(.invalidArgument, "'\(name)' looks like an IP address; --dns takes DNS names only (Sigil does not issue IP SANs)")
        }
        var labels = name.split(separator: ".", omittingEmptySubsequences: false)
        if labels.first == "*" { labels.removeFirst() }
        guard !labels.isEmpty else {
            throw SigilError(.invalidArgument, "DNS name '\(name)' has no labels")
        }
        for label in labels {
            let ok = !label.isEmpty && label.utf8.count <= 63
                && label.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 65 && $0 <= 90) || ($0 >= 48 && $0 <= 57) || $0 == 45 }
                && label.first != "-" && label.last != "-"
            guard ok else {
                throw SigilError(.invalidArgument, "DNS name '\(name)' has an invalid label '\(label)'; labels are 1-63 letters, digits or inner dashes")
            }
        }
    }
}
