/// The one error type of SigilCore: a code a program can switch on and a message a person can act on.
///
/// Modelled on swift-certificates' `CertificateError`: a struct (so new codes never break callers)
/// carrying a stable code and a human sentence that says what is wrong and, where it helps, what to do.
public struct SigilError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Backing: String, Hashable, Sendable {
            case invalidSpiffeID
            case invalidTrustDomain
            case invalidArgument
            case invalidCertificate
            case invalidBundle
            case weakKey
            case unsupportedKey
            case invalidJWT
        }
        let backing: Backing
        public var description: String { backing.rawValue }

        /// A string is not a valid SPIFFE ID; the message names the rule of the SPIFFE-ID spec it broke.
        public static let invalidSpiffeID = Code(backing: .invalidSpiffeID)
        /// A string is not a valid trust domain name.
        public static let invalidTrustDomain = Code(backing: .invalidTrustDomain)
        /// A value given to an API is out of its allowed range.
        public static let invalidArgument = Code(backing: .invalidArgument)
        /// A certificate cannot be used for what it was given for.
        public static let invalidCertificate = Code(backing: .invalidCertificate)
        /// A trust bundle document could not be read.
        public static let invalidBundle = Code(backing: .invalidBundle)
        /// A key is of a supported type but too weak (RSA under 2048 bits).
        public static let weakKey = Code(backing: .weakKey)
        /// A key's algorithm or curve is not one Sigil signs for.
        public static let unsupportedKey = Code(backing: .unsupportedKey)
        /// A JWT-SVID was rejected: malformed, wrongly signed, expired, for another audience or trust domain.
        public static let invalidJWT = Code(backing: .invalidJWT)
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
