#if canImport(Glibc)
import Glibc
#endif

/// One running instance per data directory: an exclusive `flock` on `<directory>/<name>`, held
/// until the process ends (the kernel releases it, however the process ends). A second server (or
/// agent) on the same directory would rotate the same CA or renew the same identity twice over.
public enum InstanceLock {
    /// Takes the lock or says who holds it. The lock file (0600) holds the holder's PID.
    public static func acquire(directory: String, name: String, role: String) throws(InstanceLockError) {
        let path = directory + "/" + name
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            throw InstanceLockError(message: "cannot create the lock file '\(path)': \(String(cString: strerror(errno)))")
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            if errno == EINTR { continue }
            let holder = readHolder(fd)
            close(fd)
            throw InstanceLockError(message: "another sigil \(role)\(holder.map { " (pid \($0))" } ?? "") is running on '\(directory)'; stop it first, or give this one a --data-dir of its own")
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        // fd stays open (and locked) for the life of the process.
    }

    static func readHolder(_ fd: Int32) -> Int? {
        var buffer = [UInt8](repeating: 0, count: 32)
        let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 31, 0) }
        guard n > 0 else { return nil }
        return Int(String(decoding: buffer[..<n], as: UTF8.self).filter(\.isNumber))
    }
}

public struct InstanceLockError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}
