/// The one error type of SigilStore.
public struct StoreError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        enum Backing: String, Hashable, Sendable {
            case cannotOpen, alreadyInitialized, notInitialized, duplicateSerial, conflict, corrupt, io
        }
        let backing: Backing
        public var description: String { backing.rawValue }
        /// The database file or its directory cannot be created, opened or written.
        public static let cannotOpen = Code(backing: .cannotOpen)
        /// A CA already exists in this store.
        public static let alreadyInitialized = Code(backing: .alreadyInitialized)
        /// No CA has been initialized in this store yet.
        public static let notInitialized = Code(backing: .notInitialized)
        /// A certificate with this serial number was already recorded.
        public static let duplicateSerial = Code(backing: .duplicateSerial)
        /// A write conflicts with the stored state (unknown authority, forbidden state change).
        public static let conflict = Code(backing: .conflict)
        /// A stored value could not be read back.
        public static let corrupt = Code(backing: .corrupt)
        /// Any other database failure.
        public static let io = Code(backing: .io)
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
