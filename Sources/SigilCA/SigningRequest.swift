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
        let csr: CertificateSigningRequest
        do {
            if let text = String(bytes: bytes, encoding: .utf8), text.contains("-----BEGIN") {
                let document = try PEMDocument(pemString: text)
                guard document.discriminator == "CERTIFICATE REQUEST" || document.discriminator == "NEW CERTIFICATE REQUEST" else {
                    throw CAError(.invalidCSR, "the PEM block is a '\(document.discriminator)', not a CERTIFICATE REQUEST")
                }
                csr = try CertificateSigningRequest(derEncoded: document.derBytes)
            } else {
                csr = try CertificateSigningRequest(derEncoded: bytes)
            }
        } catch let error as CAError {
            throw error
        } catch {
            if bytes.isEmpty {
                throw CAError(.invalidCSR, "the CSR is empty")
            }
            throw CAError(.invalidCSR, "the CSR is not a valid PKCS#10 request (PEM or DER) with an ECDSA P-256/P-384 or RSA 2048+ key: \(error)")
        }
        try self.init(csr: csr, keyPolicy: keyPolicy)
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
}
