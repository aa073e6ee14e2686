#if canImport(Glibc)
import Glibc
#endif

/// Hands back the executable's code pages that only start-up needed.
///
/// A static Swift binary is large (the TLS library, HTTP/2, gRPC for the Workload API, Foundation);
/// start-up touches code all over it, and the kernel maps file pages in 64 KiB windows, so a fresh
/// proxy shows tens of MB of *file-backed, clean, shared* code pages in its RSS that it will never
/// run again. Once the proxy is serving, this drops them from the process's page tables
/// (`MADV_DONTNEED` on the read-only, never-written code mappings only: they stay in the page
/// cache and fault back in on use). The steady-state RSS then shows the working set.
enum StartupPages {
    /// Returns the number of bytes of mappings advised.
    @discardableResult
    static func release() -> Int {
        var executable = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &executable, executable.count - 1)
        guard n > 0 else { return 0 }
        let path = String(decoding: executable[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard let file = fopen("/proc/self/maps", "r") else { return 0 }
        defer { fclose(file) }
        var advised = 0
        var line = [CChar](repeating: 0, count: 8192)
        while fgets(&line, Int32(line.count), file) != nil {
            let length = line.firstIndex(of: 0) ?? line.count
            let text = String(decoding: line[0..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self).trimmingTrailingNewline()
            // "start-end perms offset dev inode path"
            let fields = text.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 6, fields[5] == path else { continue }
            let perms = fields[1]
            // Only never-written code: r-x. Never touch writable or RELRO (r--, relocated) mappings.
            guard perms.hasPrefix("r-x") else { continue }
            let range = fields[0].split(separator: "-")
            guard range.count == 2, let start = UInt(range[0], radix: 16), let end = UInt(range[1], radix: 16), end > start else { continue }
            if madvise(UnsafeMutableRawPointer(bitPattern: start), Int(end - start), MADV_DONTNEED) == 0 {
                advised += Int(end - start)
            }
        }
        return advised
    }
}

extension String {
    fileprivate func trimmingTrailingNewline() -> String {
        var s = self
        while s.last == "\n" { s.removeLast() }
        return s
    }
}
