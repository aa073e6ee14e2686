#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One file as `stat(2)` sees it, symbolic links followed: device, inode, size, and the
/// modification and change times in nanoseconds. Two stamps of one path differ when the file was
/// written, replaced (a rename over it) or re-pointed: a Kubernetes ConfigMap volume swaps its
/// `..data` link to a new directory while each file's own link stays as it was, so only the file a
/// path resolves to shows the change (`lstat` of the link would not). A path that cannot be
/// stat'ed gets a stamp too (its error number), so a file that appears or disappears is a change.
public struct FileStamp: Equatable, Sendable {
    public let path: String
    private var fields: [Int] = []

    public init(path: String) {
        self.path = path
        var st = stat()
        guard stat(path, &st) == 0 else {
            fields = [Int(errno)]
            return
        }
        #if canImport(Darwin)
        let (modified, changed) = (st.st_mtimespec, st.st_ctimespec)
        #else
        let (modified, changed) = (st.st_mtim, st.st_ctim)
        #endif
        fields = [0, Int(truncatingIfNeeded: st.st_dev), Int(truncatingIfNeeded: st.st_ino), Int(st.st_size),
                  Int(modified.tv_sec), Int(modified.tv_nsec), Int(changed.tv_sec), Int(changed.tv_nsec)]
    }

    /// The size of the file `path` resolves to, or nil when it cannot be stat'ed. (Here, not in
    /// the modules that import NIO: there the C `stat` type resolves through NIO's own C module
    /// in one build mode and through CoreFoundation in the other.)
    public static func size(of path: String) -> Int? {
        var st = stat()
        return stat(path, &st) == 0 ? Int(st.st_size) : nil
    }

    public enum Kind: Sendable { case regular, directory, socket, symbolicLink, other }

    /// What `path` itself is (`lstat`: a link is not followed) and its size; nil when nothing is there.
    public static func kind(of path: String) -> (kind: Kind, size: Int)? {
        var st = stat()
        guard lstat(path, &st) == 0 else { return nil }
        let kind: Kind = switch st.st_mode & S_IFMT {
        case S_IFREG: .regular
        case S_IFDIR: .directory
        case S_IFSOCK: .socket
        case S_IFLNK: .symbolicLink
        default: .other
        }
        return (kind, Int(st.st_size))
    }

    /// The policy files in a directory (`.yaml`, `.yml` and `.json`, the names `kubectl apply -f
    /// DIR` reads), sorted; nil when `path` is not a directory that can be read.
    public static func policyFileNames(inDirectory path: String) -> [String]? {
        guard let dir = opendir(path) else { return nil }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name.hasSuffix(".yaml") || name.hasSuffix(".yml") || name.hasSuffix(".json") { names.append(name) }
        }
        return names.sorted()
    }
}
