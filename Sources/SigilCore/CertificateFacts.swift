public import X509
import SwiftASN1
import Crypto
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

extension Certificate {
    /// The certificate's DER encoding.
    public var derBytes: [UInt8] {
        var serializer = DER.Serializer()
        // Serializing a parsed or freshly built certificate cannot fail: it was DER to begin with.
        try? serializer.serialize(self)
        return serializer.serializedBytes
    }

    /// PEM text (`-----BEGIN CERTIFICATE-----`), ending with a newline.
    public var pemString: String { pemEncode(derBytes) }

    /// SHA-256 of the DER encoding, lowercase hex: the fingerprint Sigil shows and stores.
    public var sha256Fingerprint: String { hex(SHA256.hash(data: derBytes)) }

    /// The serial number as lowercase hex without separators (as `openssl x509 -serial` prints it, lowercased).
    public var serialHex: String { serialNumber.hex }

    /// The URI SANs of the certificate.
    public var uriSANs: [String] {
        guard let sans = try? extensions.subjectAlternativeNames else { return [] }
        return sans.compactMap { if case .uniformResourceIdentifier(let u) = $0 { return u } else { return nil } }
    }

    /// The SPIFFE ID in the certificate's only URI SAN, or nil if it has none, several, or an invalid one.
    public var spiffeID: SpiffeID? {
        let uris = uriSANs
        guard uris.count == 1 else { return nil }
        return try? SpiffeID(uris[0])
    }

    /// Whether basicConstraints says this is a CA.
    public var isCertificateAuthority: Bool {
        if case .isCertificateAuthority = (try? extensions.basicConstraints) ?? .notCertificateAuthority { return true }
        return false
    }

    /// Parses every certificate in a PEM text, in order. Throws if there is none or any block is not a certificate.
    public static func parseChain(pem: String, what: String = "PEM input") throws(SigilError) -> [Certificate] {
        let documents: [PEMDocument]
        do {
            documents = try PEMDocument.parseMultiple(pemString: pem)
        } catch {
            throw SigilError(.invalidCertificate, "\(what) is not valid PEM: \(error)")
        }
        guard !documents.isEmpty else {
            throw SigilError(.invalidCertificate, "\(what) holds no PEM certificate")
        }
        var certificates: [Certificate] = []
        for (index, document) in documents.enumerated() {
            guard document.discriminator == "CERTIFICATE" else {
                throw SigilError(.invalidCertificate, "\(what): PEM block \(index + 1) is a '\(document.discriminator)', not a CERTIFICATE")
            }
            do {
                certificates.append(try Certificate(derEncoded: document.derBytes))
            } catch {
                throw SigilError(.invalidCertificate, "\(what): PEM block \(index + 1) is not a valid X.509 certificate: \(error)")
            }
        }
        return certificates
    }
}

extension Certificate.SerialNumber {
    /// A random, positive serial of exactly 128 bits (the high bit set so it is never shorter).
    public static func random128() -> Certificate.SerialNumber {
        // Two 64-bit draws (two getrandom calls), not sixteen one-byte draws.
        var rng = SystemRandomNumberGenerator()
        let high = rng.next() | (1 << 63)
        let low = rng.next()
        var bytes = [UInt8](repeating: 0, count: 16)
        for i in 0..<8 {
            bytes[i] = UInt8(truncatingIfNeeded: high >> (56 - 8 * i))
            bytes[8 + i] = UInt8(truncatingIfNeeded: low >> (56 - 8 * i))
        }
        return Certificate.SerialNumber(bytes: bytes)
    }

    /// Lowercase hex of the serial's magnitude, without the DER sign byte.
    public var hex: String {
        var b = bytes[...]
        while b.count > 1, b.first == 0 { b = b.dropFirst() }
        return SigilCore.hex(b)
    }
}

/// PEM text of a DER certificate, ending with a newline.
public func pemEncode(_ der: [UInt8], label: String = "CERTIFICATE") -> String {
    let body = Data(der).base64EncodedString(options: [.lineLength64Characters, .endLineWithLineFeed])
    return "-----BEGIN \(label)-----\n" + body + "\n-----END \(label)-----\n"
}

/// `byteCount` random bytes as lowercase hex (IDs, tokens), drawn eight bytes at a time.
public func randomHex(byteCount: Int) -> String {
    var rng = SystemRandomNumberGenerator()
    var bytes: [UInt8] = []
    bytes.reserveCapacity(byteCount + 7)
    while bytes.count < byteCount {
        let word = rng.next() as UInt64
        for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
    }
    return hex(bytes.prefix(byteCount))
}

/// Lowercase hex of some bytes.
public func hex<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
    var out: [UInt8] = []
    out.reserveCapacity(bytes.underestimatedCount * 2)
    JSONText.appendHex(bytes, to: &out)
    return String(decoding: out, as: UTF8.self)
}

extension Certificate {
    /// The hex subject key identifier (computed from the key if the extension is absent): Sigil's authority ID.
    public var authorityID: String {
        let ski = (try? extensions.subjectKeyIdentifier)?.keyIdentifier ?? SubjectKeyIdentifier(hash: publicKey).keyIdentifier
        return hex(ski)
    }
}
