public import X509
import Crypto
import _CryptoExtras

/// Which public keys Sigil will put in a certificate, as SPIRE does: ECDSA P-256 and P-384, and
/// RSA of 2048 bits or more. Anything else is refused with a message naming the key and the rule.
public struct KeyPolicy: Sendable, Hashable {
    public var minimumRSABits: Int
    public var maximumRSABits: Int

    public init(minimumRSABits: Int = 2048, maximumRSABits: Int = 8192) {
        self.minimumRSABits = minimumRSABits
        self.maximumRSABits = maximumRSABits
    }

    public static let `default` = KeyPolicy()

    /// What kind of key this is, for the key-usage and signature-algorithm choices.
    public enum Kind: Sendable, Hashable {
        case ecdsaP256, ecdsaP384, rsa(bits: Int)
    }

    /// Checks `key` and says what kind it is, or throws `.weakKey` / `.unsupportedKey`.
    public func check(_ key: Certificate.PublicKey) throws(SigilError) -> Kind {
        if P256.Signing.PublicKey(key) != nil { return .ecdsaP256 }
        if P384.Signing.PublicKey(key) != nil { return .ecdsaP384 }
        if let rsa = _RSA.Signing.PublicKey(key) {
            let bits = rsa.keySizeInBits
            if bits < minimumRSABits {
                throw SigilError(.weakKey, "RSA key of \(bits) bits is too weak; use ECDSA P-256 or RSA of at least \(minimumRSABits) bits")
            }
            if bits > maximumRSABits {
                throw SigilError(.unsupportedKey, "RSA key of \(bits) bits is larger than the \(maximumRSABits) bits Sigil accepts")
            }
            return .rsa(bits: bits)
        }
        if P521.Signing.PublicKey(key) != nil {
            throw SigilError(.unsupportedKey, "ECDSA P-521 keys are not supported; use ECDSA P-256 (recommended), P-384 or RSA 2048+")
        }
        throw SigilError(.unsupportedKey, "\(key) keys are not supported; use ECDSA P-256 (recommended), P-384 or RSA 2048+")
    }
}

extension Certificate.PrivateKey {
    /// The signature algorithm Sigil signs with for this issuer key.
    public var sigilSignatureAlgorithm: Certificate.SignatureAlgorithm {
        get throws(SigilError) {
            switch try KeyPolicy.default.check(publicKey) {
            case .ecdsaP256: return .ecdsaWithSHA256
            case .ecdsaP384: return .ecdsaWithSHA384
            case .rsa: return .sha256WithRSAEncryption
            }
        }
    }
}
