public import X509
import SigilCore
#if canImport(Glibc)
import Glibc
#endif
#if canImport(CoreFoundation)
public import CoreFoundation  // Glibc's struct members (stat, mode_t) resolve through it
#endif
import Foundation
import SwiftASN1

/// Private key files: PKCS#8 PEM, mode 0600, in directories of mode 0700, written atomically and
/// never logged. Reading refuses a key file that group or others can read, as ssh does.
public enum KeyFiles {
    /// Creates `path` (and missing parents) with mode 0700, or tightens an existing directory to 0700.
    public static func ensurePrivateDirectory(_ path: String) throws(CAError) {
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) {
            guard isDirectory.boolValue else {
                throw CAError(.dataDirectory, "'\(path)' exists and is not a directory; choose another --data-dir")
            }
        } else {
            try makeDirectories(path)
        }
        guard chmod(path, 0o700) == 0 else {
            throw CAError(.dataDirectory, "cannot set mode 0700 on '\(path)': \(String(cString: strerror(errno)))")
        }
        // Probe that it is writable (root bypasses modes, but not read-only file systems).
        let probe = path + "/.sigil-write-probe-\(getpid())"
        let fd = open(probe, O_WRONLY | O_CREAT | O_EXCL, 0o600)
        guard fd >= 0 else {
            throw CAError(.dataDirectory, "directory '\(path)' is not writable: \(String(cString: strerror(errno)))")
        }
        close(fd)
        unlink(probe)
    }

    /// Writes `key` as PKCS#8 PEM to `path` with mode 0600; the file appears whole or not at all.
    public static func write(_ key: Certificate.PrivateKey, to path: String) throws(CAError) {
        let pem: String
        do {
            pem = try key.serializeAsPEM().pemString + "\n"
        } catch {
            throw CAError(.keyFile, "cannot encode the private key for '\(path)': \(error)")
        }
        try writeAtomically(Array(pem.utf8), to: path, mode: 0o600)
    }

    /// Reads a private key (PKCS#8, SEC1 or PKCS#1 PEM). With `requirePrivateMode`, refuses a file
    /// that group or others may read.
    public static func read(_ path: String, requirePrivateMode: Bool = true) throws(CAError) -> Certificate.PrivateKey {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw CAError(.keyFile, "cannot read key file '\(path)': \(String(cString: strerror(errno)))")
        }
        if requirePrivateMode, st.st_mode & 0o077 != 0 {
            throw CAError(.keyFile, "key file '\(path)' has mode \(String(st.st_mode & 0o777, radix: 8)); it must not be readable by group or others (chmod 600 '\(path)')")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw CAError(.keyFile, "cannot read key file '\(path)'")
        }
        let text = String(decoding: data, as: UTF8.self)
        do {
            return try Certificate.PrivateKey(pemEncoded: text)
        } catch {
            throw CAError(.keyFile, "'\(path)' is not a PEM private key Sigil can use (PKCS#8, SEC1 EC or PKCS#1 RSA; RSA of 2048+ bits): \(error)")
        }
    }

    /// Writes bytes to a temporary file beside `path`, fsyncs, then renames it into place.
    public static func writeAtomically(_ bytes: [UInt8], to path: String, mode: mode_t) throws(CAError) {
        let temporary = path + ".tmp-\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        guard fd >= 0 else {
            throw CAError(.dataDirectory, "cannot create '\(temporary)': \(String(cString: strerror(errno)))")
        }
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + offset, bytes.count - offset) }
            if n < 0 {
                if errno == EINTR { continue }
                let message = String(cString: strerror(errno))
                close(fd)
                unlink(temporary)
                throw CAError(.dataDirectory, "cannot write '\(temporary)': \(message)")
            }
            offset += n
        }
        fchmod(fd, mode)
        guard fsync(fd) == 0 else {
            let message = String(cString: strerror(errno))
            close(fd)
            unlink(temporary)
            throw CAError(.dataDirectory, "cannot sync '\(temporary)': \(message)")
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            let message = String(cString: strerror(errno))
            unlink(temporary)
            throw CAError(.dataDirectory, "cannot move '\(temporary)' to '\(path)': \(message)")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let dfd = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY)
        if dfd >= 0 {
            fsync(dfd)
            close(dfd)
        }
    }

    /// `mkdir -p` with mode 0700 for what it creates, reporting the system's reason on failure.
    static func makeDirectories(_ path: String) throws(CAError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            var st = stat()
            if stat(prefix, &st) == 0 {
                guard st.st_mode & S_IFMT == S_IFDIR else {
                    throw CAError(.dataDirectory, "cannot create directory '\(path)': '\(prefix)' is a file, not a directory; choose another --data-dir")
                }
                continue
            }
            if mkdir(prefix, 0o700) != 0 && errno != EEXIST {
                throw CAError(.dataDirectory, "cannot create directory '\(path)': \(String(cString: strerror(errno))) (at '\(prefix)'); choose a --data-dir you can write to")
            }
        }
    }
}
