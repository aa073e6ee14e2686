public import Crypto

/// What retention leaves where it cut a writer's chain: the seq and hash of the last removed row,
/// signed by the server's ledger checkpoint key. `sigil audit verify` continues the chain from the
/// checkpoint's hash, so a ledger pruned by retention stays verifiable, and rows removed any other
/// way (no checkpoint, or one whose signature fails) are reported.
public struct LedgerCheckpoint: Sendable, Hashable {
    public var writer: String
    /// The last removed row.
    public var seq: UInt64
    /// Its hash (64 lowercase hex digits): the `prev` of the first kept row.
    public var hash: String
    /// Rows removed by this cut.
    public var rowsRemoved: UInt64
    /// Rows older than this (Unix µs) were due for removal.
    public var cutoffMicros: Int64
    /// When the cut was made (Unix µs).
    public var madeAtMicros: Int64
    /// ``LedgerCheckpointKey/keyID`` of the signing key.
    public var keyID: String
    /// ECDSA P-256 / SHA-256 signature (DER) over ``signedBytes``.
    public var signature: [UInt8]

    public init(writer: String, seq: UInt64, hash: String, rowsRemoved: UInt64, cutoffMicros: Int64, madeAtMicros: Int64,
                keyID: String = "", signature: [UInt8] = []) {
        self.writer = writer
        self.seq = seq
        self.hash = hash
        self.rowsRemoved = rowsRemoved
        self.cutoffMicros = cutoffMicros
        self.madeAtMicros = madeAtMicros
        self.keyID = keyID
        self.signature = signature
    }

    /// The bytes the signature covers: a fixed label, then every field as `<length>:<bytes>` (no
    /// field can run into the next, whatever a writer's name holds).
    public var signedBytes: [UInt8] {
        var out = Array("sigil-ledger-checkpoint-v1".utf8)
        for field in [writer, String(seq), hash, String(rowsRemoved), String(cutoffMicros), String(madeAtMicros), keyID] {
            out.append(0x0A)
            out.append(contentsOf: Array(String(field.utf8.count).utf8))
            out.append(0x3A)
            out.append(contentsOf: Array(field.utf8))
        }
        return out
    }
}

/// The server's ledger checkpoint key (P-256). The private half signs checkpoints; audits check them
/// with the public half.
public struct LedgerCheckpointKey: Sendable {
    public let publicKey: P256.Signing.PublicKey
    private let privateKey: P256.Signing.PrivateKey?
    /// The first 16 hex digits of the SHA-256 of the public key (SubjectPublicKeyInfo DER).
    public let keyID: String

    /// A new key.
    public init() {
        self.init(privateKey: P256.Signing.PrivateKey())
    }

    public init(privateKey: P256.Signing.PrivateKey) {
        self.privateKey = privateKey
        self.publicKey = privateKey.publicKey
        self.keyID = Self.keyID(of: privateKey.publicKey)
    }

    public init(publicKey: P256.Signing.PublicKey) {
        self.privateKey = nil
        self.publicKey = publicKey
        self.keyID = Self.keyID(of: publicKey)
    }

    static func keyID(of key: P256.Signing.PublicKey) -> String {
        var hex: [UInt8] = []
        SHA256.hash(data: key.derRepresentation).withUnsafeBytes { JSONText.appendHex($0, to: &hex) }
        return String(decoding: hex.prefix(16), as: UTF8.self)
    }

    /// `checkpoint` with this key's id and signature; nil for a key without its private half.
    public func sign(_ checkpoint: LedgerCheckpoint) -> LedgerCheckpoint? {
        guard let privateKey else { return nil }
        var signed = checkpoint
        signed.keyID = keyID
        guard let signature = try? privateKey.signature(for: signed.signedBytes) else { return nil }
        signed.signature = Array(signature.derRepresentation)
        return signed
    }

    /// Whether `checkpoint` was signed by this key and not changed since.
    public func isValid(_ checkpoint: LedgerCheckpoint) -> Bool {
        guard checkpoint.keyID == keyID, let signature = try? P256.Signing.ECDSASignature(derRepresentation: checkpoint.signature) else {
            return false
        }
        return publicKey.isValidSignature(signature, for: checkpoint.signedBytes)
    }
}
