/// The one error type of SigilCA: a code and a message that says what to do.
public struct CAError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Backing: String, Hashable, Sendable {
            case alreadyInitialized, notInitialized, dataDirectory, keyFile, invalidCSR, invalidUpstream, policy, store, unknownAuthority
        }
        let backing: Backing
        public var description: String { backing.rawValue }
        /// `ca init` found an existing CA and `--force` was not given.
        public static let alreadyInitialized = Code(backing: .alreadyInitialized)
        /// The data directory holds no CA yet.
        public static let notInitialized = Code(backing: .notInitialized)
        /// The data directory cannot be created, read or written, or has unsafe permissions.
        public static let dataDirectory = Code(backing: .dataDirectory)
        /// A key file is missing, unreadable, malformed or has unsafe permissions.
        public static let keyFile = Code(backing: .keyFile)
        /// A certificate signing request is malformed, badly signed or carries an unacceptable key.
        public static let invalidCSR = Code(backing: .invalidCSR)
        /// The upstream CA certificate or key cannot be used.
        public static let invalidUpstream = Code(backing: .invalidUpstream)
        /// A request breaks a signing rule (wrong trust domain, bad TTL, bad SPIFFE ID).
        public static let policy = Code(backing: .policy)
        /// The datastore failed.
        public static let store = Code(backing: .store)
        /// No authority has the ID given (see `sigil ca status`).
        public static let unknownAuthority = Code(backing: .unknownAuthority)
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
