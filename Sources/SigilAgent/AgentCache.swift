import SigilCore
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The agent's on-disk state, so it keeps serving workloads across restarts and server outages:
///
///     <data-dir>/            0700
///       agent.key            0600  the agent's private key (PKCS#8 DER)
///       agent.der            0600  the agent's SVID chain (DER, JSON-wrapped)
///       cache.json           0600  entries, workload SVIDs and keys, bundle
///
/// Files are written to a temporary name, fsynced and renamed.
struct AgentCache: Sendable {
    let directory: String

    struct AgentIdentity: Codable, Sendable {
        var agentID: String
        var chainDER: [[UInt8]]
        var keyPKCS8DER: [UInt8]
        var notAfter: Date
        var trustDomain: String
        var receivedAt: Date?
    }

    struct Snapshot: Codable, Sendable {
        var trustDomain: String
        var agentID: String
        var entries: [AgentEntry]
        var svids: [HeldSVID]
        var bundleRoots: [[UInt8]]
        var bundleSequence: UInt64
        var jwtKeysJSON: [UInt8]
    }

    init(directory: String) throws(AgentError) {
        self.directory = directory
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else { throw AgentError(usage: "--data-dir '\(directory)' is a file, not a directory") }
        } else {
            do {
                try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            } catch {
                throw AgentError("cannot create --data-dir '\(directory)': \(error.localizedDescription)")
            }
        }
        // The cache decides what workloads are served: refuse a directory another user owns or can
        // write (someone could have created /tmp/sigil/agent first and planted a cache.json).
        var st = stat()
        guard lstat(directory, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw AgentError(usage: "--data-dir '\(directory)' is not a directory")
        }
        guard st.st_uid == geteuid() else {
            throw AgentError("--data-dir '\(directory)' belongs to uid \(st.st_uid), not to this agent (uid \(geteuid())); use a directory the agent owns")
        }
        guard chmod(directory, 0o700) == 0 else {
            throw AgentError("cannot set mode 0700 on --data-dir '\(directory)': \(String(cString: strerror(errno)))")
        }
    }

    var identityPath: String { directory + "/agent.json" }
    var cachePath: String { directory + "/cache.json" }

    func loadIdentity() -> AgentIdentity? { load(identityPath) }
    func saveIdentity(_ identity: AgentIdentity) throws(AgentError) { try save(identity, to: identityPath) }
    func loadSnapshot() -> Snapshot? { load(cachePath) }
    func saveSnapshot(_ snapshot: Snapshot) throws(AgentError) { try save(snapshot, to: cachePath) }

    private func load<T: Decodable>(_ path: String) -> T? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONDecoder().decode(T.self, from: data)
    }

    private func save<T: Encodable>(_ value: T, to path: String) throws(AgentError) {
        let data: Data
        do {
            data = try JSONEncoder().encode(value)
        } catch {
            throw AgentError("cannot encode \(path): \(error)")
        }
        let temporary = path + ".tmp"
        try Self.writeSynced(data, to: temporary)
        guard rename(temporary, path) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(temporary)
            throw AgentError("cannot rename \(temporary): \(reason)")
        }
        // The rename itself survives a crash only once the directory is synced.
        let dir = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 { fsync(dir); close(dir) }
    }

    /// Writes `data` to a new 0600 file at `path` and fsyncs it; on failure the file is removed (a
    /// full disk must not fill up with empty leftovers) and the error names the path.
    private static func writeSynced(_ data: Data, to path: String) throws(AgentError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw AgentError("cannot write \(path): \(String(cString: strerror(errno)))") }
        fchmod(fd, 0o600)
        var offset = 0
        var failure: Int32 = 0
        data.withUnsafeBytes { bytes in
            while offset < bytes.count {
                let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if n < 0, errno == EINTR { continue }
                // A short write with no error (the last block that still fitted) is retried: the
                // next write reports why it cannot go on.
                guard n > 0 else { failure = n == 0 ? ENOSPC : errno; return }
                offset += n
            }
        }
        if failure == 0, fsync(fd) != 0 { failure = errno }
        if close(fd) != 0, failure == 0 { failure = errno }
        guard failure == 0 else {
            unlink(path)
            throw AgentError("cannot write \(path): \(String(cString: strerror(failure)))")
        }
    }

    /// The name of the file ``probeWritable()`` writes and removes.
    static let probeName = ".write-probe"

    /// Checks that the directory takes a new file (written, fsynced, removed) before anything that
    /// cannot be undone, such as spending the single-use join token: an agent that attested and then
    /// could not save its SVID would need a new token.
    func probeWritable() throws(AgentError) {
        let path = directory + "/" + Self.probeName
        // About the size of agent.json (a chain and a key, JSON-wrapped).
        let probe = Data(repeating: 0x20, count: 32 * 1024)  // an agent.json with a long upstream chain
        do {
            try Self.writeSynced(probe, to: path)
        } catch {
            throw AgentError("--data-dir '\(directory)' cannot be written (\(error.message)); free space there or fix its permissions, then start the agent again (the join token was not used)")
        }
        guard unlink(path) == 0 else {
            throw AgentError("--data-dir '\(directory)' cannot be written: cannot remove \(path): \(String(cString: strerror(errno)))")
        }
    }
}

/// The agent's error: a message that says what to do.
public struct AgentError: Error, CustomStringConvertible, Sendable {
    public let message: String
    /// The agent's own settings are wrong (exit 2), rather than the agent being refused or failing (exit 1).
    public let isUsage: Bool
    public init(_ message: String) { self.message = message; self.isUsage = false }
    public init(usage message: String) { self.message = message; self.isUsage = true }
    public var description: String { message }
}
