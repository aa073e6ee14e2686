public import X509
import SwiftASN1
import Crypto
#if canImport(FoundationEssentials)
public import FoundationEssentials
#else
public import Foundation
#endif

/// An X509-SVID as DER, with the facts the CA records about it.
public struct EncodedLeaf: Sendable {
    public let der: [UInt8]
    /// Serial number, lowercase hex.
    public let serialHex: String
    public let notBefore: Date
    public let notAfter: Date
}

/// The CA's hot path: writes a leaf's DER straight from fragments encoded once per profile and per
/// issuer, then signs it. It produces byte for byte the TBSCertificate that
/// ``SVIDProfile/makeCertificate(publicKey:issuer:now:serialNumber:)`` builds through
/// swift-certificates (a unit test holds the two together); it only skips re-encoding the parts
/// that never change from one SVID to the next.
extension SVIDProfile {
    public func encodeLeaf(
        publicKey: Certificate.PublicKey,
        issuer: SigningAuthority,
        now: Date,
        serialNumber: Certificate.SerialNumber = .random128()
    ) throws(SigilError) -> EncodedLeaf {
        let (kind, from, until) = try preflight(publicKey: publicKey, issuer: issuer, now: now)
        // Whole seconds, as X.509 times carry them (swift-certificates rounds the same way).
        let notBefore = Date(timeIntervalSince1970: from.timeIntervalSince1970.rounded())
        let notAfter = Date(timeIntervalSince1970: until.timeIntervalSince1970.rounded())

        var extensions = DERWriter()
        extensions.raw(fixedExtensionDER[0])  // basicConstraints
        extensions.raw(kind.isRSA ? rsaKeyUsageDER : ecKeyUsageDER)
        extensions.raw(fixedExtensionDER[1])  // extendedKeyUsage
        extensions.raw(fixedExtensionDER[2])  // subjectAltName
        extensions.raw(DERWriter.extensionDER(oid: subjectKeyIdentifierOID, critical: false,
                                              value: DERWriter.octetString(SubjectKeyIdentifier(hash: publicKey).keyIdentifier)))
        extensions.raw(issuer.authorityKeyIdentifierDER)

        var tbs = DERWriter()
        tbs.raw([0xa0, 0x03, 0x02, 0x01, 0x02])  // [0] EXPLICIT version v3
        tbs.integer(serialNumber.bytes)
        tbs.raw(issuer.signatureAlgorithmDER)
        tbs.raw(issuer.subjectDER)
        var validity = DERWriter()
        validity.time(notBefore)
        validity.time(notAfter)
        tbs.tlv(0x30, validity.bytes)
        tbs.raw(subjectDER)
        var spki = DER.Serializer()
        do {
            try spki.serialize(publicKey)
        } catch {
            throw SigilError(.invalidCertificate, "cannot encode the public key for \(spiffeID): \(error)")
        }
        tbs.raw(spki.serializedBytes)
        var wrapped = DERWriter()
        wrapped.tlv(0x30, extensions.bytes)
        tbs.tlv(0xa3, wrapped.bytes)
        var tbsSequence = DERWriter()
        tbsSequence.tlv(0x30, tbs.bytes)

        let signature: [UInt8]
        do {
            if let p256 = issuer.p256Key {
                signature = Array(try p256.signature(for: tbsSequence.bytes).derRepresentation)
            } else {
                signature = try issuer.privateKey.sign(bytes: tbsSequence.bytes, signatureAlgorithm: issuer.signatureAlgorithm).rawRepresentation
            }
        } catch {
            throw SigilError(.invalidCertificate, "signing the X509-SVID for \(spiffeID) failed: \(error)")
        }
        var body = tbsSequence
        body.raw(issuer.signatureAlgorithmDER)
        body.tlv(0x03, [0x00] + signature)
        var certificate = DERWriter()
        certificate.tlv(0x30, body.bytes)
        return EncodedLeaf(der: certificate.bytes, serialHex: serialNumber.hex, notBefore: notBefore, notAfter: notAfter)
    }
}

let subjectKeyIdentifierOID: ASN1ObjectIdentifier = [2, 5, 29, 14]

extension KeyPolicy.Kind {
    var isRSA: Bool { if case .rsa = self { return true } else { return false } }
}

/// Just enough DER writing for certificates: tag-length-value, integers, times.
struct DERWriter {
    var bytes: [UInt8] = []

    init() { bytes.reserveCapacity(512) }

    mutating func raw<C: Collection>(_ more: C) where C.Element == UInt8 { bytes.append(contentsOf: more) }

    mutating func tlv<C: Collection>(_ tag: UInt8, _ content: C) where C.Element == UInt8 {
        bytes.append(tag)
        let n = content.count
        if n < 0x80 {
            bytes.append(UInt8(n))
        } else if n <= 0xff {
            bytes.append(contentsOf: [0x81, UInt8(n)])
        } else if n <= 0xffff {
            bytes.append(contentsOf: [0x82, UInt8(n >> 8), UInt8(n & 0xff)])
        } else {
            bytes.append(contentsOf: [0x83, UInt8(n >> 16), UInt8((n >> 8) & 0xff), UInt8(n & 0xff)])
        }
        bytes.append(contentsOf: content)
    }

    /// A positive INTEGER from big-endian magnitude bytes.
    mutating func integer(_ magnitude: ArraySlice<UInt8>) {
        var m = magnitude
        while m.count > 1, m.first == 0 { m = m.dropFirst() }
        if let first = m.first, first & 0x80 != 0 {
            tlv(0x02, [0x00] + m)
        } else {
            tlv(0x02, m)
        }
    }

    /// UTCTime for 1950–2049, GeneralizedTime otherwise (RFC 5280 section 4.1.2.5).
    mutating func time(_ date: Date) {
        let (y, mo, d, h, mi, s) = civil(Int64(date.timeIntervalSince1970.rounded()))
        func two(_ v: Int) -> [UInt8] { [UInt8(48 + v / 10), UInt8(48 + v % 10)] }
        var text: [UInt8] = []
        if (1950..<2050).contains(y) {
            text += two(y % 100)
        } else {
            text += two(y / 100) + two(y % 100)
        }
        text += two(mo) + two(d) + two(h) + two(mi) + two(s) + [UInt8(ascii: "Z")]
        tlv((1950..<2050).contains(y) ? 0x17 : 0x18, text)
    }

    static func octetString<C: Collection>(_ content: C) -> [UInt8] where C.Element == UInt8 {
        var w = DERWriter()
        w.tlv(0x04, content)
        return w.bytes
    }

    /// Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue OCTET STRING }.
    static func extensionDER(oid: ASN1ObjectIdentifier, critical: Bool, value: [UInt8]) -> [UInt8] {
        var inner = DERWriter()
        var serializer = DER.Serializer()
        try? serializer.serialize(oid)
        inner.raw(serializer.serializedBytes)
        if critical { inner.raw([0x01, 0x01, 0xff]) }
        inner.tlv(0x04, value)
        var outer = DERWriter()
        outer.tlv(0x30, inner.bytes)
        return outer.bytes
    }

    static func extensionDER(_ ext: Certificate.Extension) -> [UInt8] {
        var inner = DERWriter()
        var serializer = DER.Serializer()
        try? serializer.serialize(ext.oid)
        inner.raw(serializer.serializedBytes)
        if ext.critical { inner.raw([0x01, 0x01, 0xff]) }
        inner.tlv(0x04, ext.value)
        var outer = DERWriter()
        outer.tlv(0x30, inner.bytes)
        return outer.bytes
    }

    /// Days-from-civil inverse (H. Hinnant's algorithm): epoch seconds → UTC calendar fields.
    func civil(_ seconds: Int64) -> (Int, Int, Int, Int, Int, Int) {
        var days = seconds / 86_400
        var rem = seconds % 86_400
        if rem < 0 { rem += 86_400; days -= 1 }
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        return (Int(y), Int(m), Int(d), Int(rem / 3600), Int(rem % 3600 / 60), Int(rem % 60))
    }
}
