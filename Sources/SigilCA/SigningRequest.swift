public import X509
public import SigilCore
import SwiftASN1
import Foundation

/// A certificate signing request that has passed Sigil's checks: well-formed (PEM or DER), its
/// signature verified against its own public key, and that key acceptable under the ``KeyPolicy``.
///
/// Only ``publicKey`` is ever used to build a certificate. What the requester asked for (a CA
/// flag, extra SANs, a subject) is kept for logs only, in ``requestedExtensionCount``.
public struct SigningRequest: Sendable {
    public let publicKey: Certificate.PublicKey
    public let keyKind: KeyPolicy.Kind
    /// How many extensions the CSR asked for (ignored for signing).
    public let requestedExtensionCount: Int

    /// Parses and checks a CSR given as PEM text or raw DER bytes.
    public init(bytes: [UInt8], keyPolicy: KeyPolicy = .default) throws(CAError) {
        if bytes.isEmpty {
            throw CAError(.invalidCSR, "the CSR is empty")
        }
        var der = bytes
        if bytes.first != 0x30, let text = String(bytes: bytes, encoding: .utf8), text.contains("-----BEGIN") {
            let document: PEMDocument
            do {
                document = try PEMDocument(pemString: text)
            } catch {
                throw CAError(.invalidCSR, "the CSR is not valid PEM (expected one '-----BEGIN CERTIFICATE REQUEST-----' block with base64 inside)")
            }
            guard document.discriminator == "CERTIFICATE REQUEST" || document.discriminator == "NEW CERTIFICATE REQUEST" else {
                throw CAError(.invalidCSR, "the PEM block is a '\(document.discriminator)', not a CERTIFICATE REQUEST")
            }
            der = document.derBytes
        }
        let csr: CertificateSigningRequest
        do {
            csr = try CertificateSigningRequest(derEncoded: der)
        } catch {
            // swift-crypto refuses to even parse RSA keys under 2048 bits: say so by name.
            if let bits = SigningRequest.rsaModulusBits(csrDER: der), bits < keyPolicy.minimumRSABits {
                throw CAError(.invalidCSR, "the CSR's key is refused: RSA key of \(bits) bits is too weak; use ECDSA P-256 or RSA of at least \(keyPolicy.minimumRSABits) bits")
            }
            throw CAError(.invalidCSR, "the CSR is not a valid PKCS#10 certificate request (PEM 'CERTIFICATE REQUEST' or DER) with an ECDSA P-256/P-384 or RSA 2048+ key")
        }
        try self.init(csr: csr, keyPolicy: keyPolicy)
    }

    /// A key generated in this process (the server's own SVID): no CSR, same key policy.
    public init(trustedPublicKey: Certificate.PublicKey, keyPolicy: KeyPolicy = .default) throws(CAError) {
        do {
            self.keyKind = try keyPolicy.check(trustedPublicKey)
        } catch {
            throw CAError(.invalidCSR, "the key is refused: \(error.message)")
        }
        self.publicKey = trustedPublicKey
        self.requestedExtensionCount = 0
    }

    /// Checks an already parsed CSR.
    public init(csr: CertificateSigningRequest, keyPolicy: KeyPolicy = .default) throws(CAError) {
        do {
            self.keyKind = try keyPolicy.check(csr.publicKey)
        } catch {
            throw CAError(.invalidCSR, "the CSR's key is refused: \(error.message)")
        }
        guard csr.publicKey.isValidSignature(csr.signature, for: csr) else {
            throw CAError(.invalidCSR, "the CSR's signature does not verify with its own public key; the request was altered or built wrongly")
        }
        self.publicKey = csr.publicKey
        self.requestedExtensionCount = (try? csr.attributes.extensionRequest?.extensions.count) ?? 0
    }

    /// The modulus size of an RSA key in a CSR, read straight from the DER (for error messages).
    static func rsaModulusBits(csrDER: [UInt8]) -> Int? {
        func children(_ node: ASN1Node) -> [ASN1Node]? {
            if case .constructed(let nodes) = node.content { return Array(nodes) }
            return nil
        }
        guard let root = try? DER.parse(csrDER), let info = children(root)?.first, let fields = children(info), fields.count >= 3,
              let spki = children(fields[2]), spki.count == 2, let algorithm = children(spki[0])?.first,
              let oid = try? ASN1ObjectIdentifier(derEncoded: algorithm), oid == [1, 2, 840, 113_549, 1, 1, 1],
              let bits = try? ASN1BitString(derEncoded: spki[1]), let rsa = try? DER.parse(bits.bytes),
              let numbers = children(rsa), let modulus = numbers.first, case .primitive(var n) = modulus.content
        else { return nil }
        while n.first == 0 { n = n.dropFirst() }
        guard let top = n.first else { return 0 }
        return (n.count - 1) * 8 + (8 - top.leadingZeroBitCount)
    }
}
