import Crypto
import Foundation
public import SigilCore

extension DataDirectory {
    /// The key that signs ledger retention checkpoints (P-256, PKCS#8 PEM, 0600).
    public var ledgerCheckpointKeyPath: String { keysPath + "/ledger-checkpoint.key.pem" }
}

/// The ledger checkpoint key on disk: made by the server on first start, read by `sigil audit verify`.
public enum LedgerCheckpointKeyFile {
    /// The key, made (and written 0600) if the data directory has none yet.
    public static func loadOrCreate(_ directory: DataDirectory) throws(CAError) -> LedgerCheckpointKey {
        if let key = try load(directory) { return key }
        let key = P256.Signing.PrivateKey()
        try KeyFiles.writeAtomically(Array((key.pemRepresentation + "\n").utf8), to: directory.ledgerCheckpointKeyPath, mode: 0o600)
        return LedgerCheckpointKey(privateKey: key)
    }

    /// The key, or nil when the data directory has none (no server has run there yet).
    public static func load(_ directory: DataDirectory) throws(CAError) -> LedgerCheckpointKey? {
        let path = directory.ledgerCheckpointKeyPath
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        _ = try KeyFiles.read(path)  // refuses a key file others can read
        guard let data = FileManager.default.contents(atPath: path),
              let key = try? P256.Signing.PrivateKey(pemRepresentation: String(decoding: data, as: UTF8.self)) else {
            throw CAError(.keyFile, "ledger checkpoint key '\(path)' is not a P-256 PEM private key")
        }
        return LedgerCheckpointKey(privateKey: key)
    }
}
