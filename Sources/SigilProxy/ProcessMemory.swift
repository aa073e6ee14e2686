#if canImport(Glibc)
import Glibc
#endif
#if canImport(CoreFoundation)
import CoreFoundation  // the release build resolves Glibc struct members through it
#endif

/// Hands back the memory that only start-up (or a past burst) needed.
///
/// A static Swift binary is large (the TLS library, HTTP/2, gRPC for the Workload API, Foundation);
/// start-up touches code and read-only data all over it (the Swift runtime scans its metadata and
/// conformance tables; the kernel maps file pages in 64 KiB windows), so a fresh proxy shows tens of
/// MB of *file-backed, clean* pages in its RSS that it will never use again, and the heap keeps what
/// parsing the configuration and the first SVID freed. Once the proxy is serving, this
///
/// - drops from the page tables every read-only, private, file-backed mapping (of the executable and
///   of the shared libraries) that holds no private copy-on-write page (`Anonymous: 0 kB` in
///   `/proc/self/smaps`): such a page is byte-for-byte the file's, stays in the page cache and faults
///   back in on use. Relocated read-only data (RELRO) has anonymous pages and is never touched;
/// - returns the heap's free pages to the kernel (`malloc_trim`).
///
/// The steady-state RSS then shows the working set. ``IdleTrimmer`` does the same again whenever
/// the proxy has been idle for a while, so a sidecar that served a burst hours ago does not keep
/// the burst's pages mapped.
enum ProcessMemory {
    /// A mapping from `/proc/self/smaps` that may be dropped.
    struct Mapping: Equatable {
        var start: UInt
        var end: UInt
    }

    /// Returns the number of bytes of mappings advised.
    @discardableResult
    static func release() -> Int {
        guard let file = fopen("/proc/self/smaps", "r") else { return 0 }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
            if n <= 0 { break }
            text.append(contentsOf: chunk[0..<n])
        }
        fclose(file)
        var advised = 0
        for mapping in droppable(smaps: text) {
            if madvise(UnsafeMutableRawPointer(bitPattern: mapping.start), Int(mapping.end - mapping.start), MADV_DONTNEED) == 0 {
                advised += Int(mapping.end - mapping.start)
            }
        }
        trimHeap()
        return advised
    }

    /// One malloc arena for the whole process (glibc's `mallopt(M_ARENA_MAX, 1)`), unless the
    /// operator set `MALLOC_ARENA_MAX`. Per-thread arenas keep what a burst freed spread over
    /// several heaps that `malloc_trim` cannot shrink (measured: 14.5 MB private memory after a
    /// 64-connection burst with the default, 6 MB with one arena); glibc's per-thread caches keep
    /// small allocations off the arena lock.
    static func useOneArena() {
        guard getenv("MALLOC_ARENA_MAX") == nil else { return }
        _ = mallocFunction("mallopt", as: (@convention(c) (Int32, Int32) -> Int32).self)?(-8 /* M_ARENA_MAX */, 1)
    }

    /// glibc's `malloc_trim(0)`.
    static func trimHeap() {
        _ = mallocFunction("malloc_trim", as: (@convention(c) (Int) -> Int32).self)?(0)
    }

    /// A `<malloc.h>` function looked up at run time: Swift's Glibc module does not export that
    /// header, and other C libraries have no such calls (then nil: nothing is done).
    private static func mallocFunction<F>(_ name: String, as type: F.Type) -> F? {
        dlsym(UnsafeMutableRawPointer(bitPattern: 0), name).map { unsafeBitCast($0, to: type) }
    }

    /// The mappings of an smaps text that are private, not writable, backed by a file and hold no
    /// anonymous (copy-on-write) page.
    static func droppable(smaps: [UInt8]) -> [Mapping] {
        var result: [Mapping] = []
        var candidate: Mapping?
        var candidateClean = false
        func finish() {
            if let c = candidate, candidateClean { result.append(c) }
            candidate = nil
        }
        for line in smaps.split(separator: 0x0A) {
            guard let first = line.first else { continue }
            let isHeader = (first >= 0x30 && first <= 0x39) || (first >= 0x61 && first <= 0x66)
            if isHeader, let dash = line.firstIndex(of: 0x2D), let space = line.firstIndex(of: 0x20), dash < space {
                // "start-end perms offset dev inode path"
                finish()
                let fields = line.split(separator: 0x20, omittingEmptySubsequences: true)
                guard fields.count >= 6, fields[5].first == 0x2F else { continue }  // a file path
                let perms = Array(fields[1])
                guard perms.count == 4, perms[0] == 0x72, perms[1] == 0x2D, perms[3] == 0x70 else { continue }  // r-?p
                guard let start = UInt(String(decoding: line[line.startIndex..<dash], as: UTF8.self), radix: 16),
                      let end = UInt(String(decoding: line[(dash + 1)..<space], as: UTF8.self), radix: 16), end > start else { continue }
                candidate = Mapping(start: start, end: end)
                candidateClean = false
            } else if candidate != nil, line.starts(with: "Anonymous:".utf8) {
                let digits = line.drop(while: { $0 < 0x30 || $0 > 0x39 }).prefix(while: { $0 >= 0x30 && $0 <= 0x39 })
                candidateClean = !digits.isEmpty && digits.allSatisfy { $0 == 0x30 }
            }
        }
        finish()
        return result
    }
}

/// Gives memory back (``ProcessMemory/release()``) when the proxy is idle and has grown: the
/// process used less than `idleCPU` of CPU time in the last `interval` (1 %: an idle proxy's own
/// timers use ~0.4 %, a few requests a second stay below it) and its resident set is `growth`
/// above what it was after the last trim. Reads `getrusage` and `/proc/self/statm` once per
/// interval; nothing on the request path.
struct IdleTrimmer: Sendable {
    var interval: Duration = .seconds(10)
    var idleCPU: Duration = .milliseconds(100)
    var growth = 1 << 20

    func run() async {
        var last = Self.cpuTime()
        var floor = 0  // the first idle interval trims: start-up already dropped its pages, serving may have mapped more
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            let now = Self.cpuTime()
            let used = now - last
            last = now
            guard used < idleCPU, Self.residentBytes() > floor + growth else { continue }
            ProcessMemory.release()
            floor = Self.residentBytes()
            last = Self.cpuTime()  // the trim's own CPU is not activity
        }
    }

    /// User + system CPU time of the whole process.
    static func cpuTime() -> Duration {
        var usage = rusage()
        guard getrusage(__rusage_who_t(RUSAGE_SELF.rawValue), &usage) == 0 else { return .zero }
        func d(_ t: timeval) -> Duration { .seconds(Int64(t.tv_sec)) + .microseconds(Int64(t.tv_usec)) }
        return d(usage.ru_utime) + d(usage.ru_stime)
    }

    /// The resident set size (second field of `/proc/self/statm`, in pages); 0 if unreadable.
    static func residentBytes() -> Int {
        let fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 128)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return 0 }
        let fields = buffer[0..<n].split(separator: 0x20)
        guard fields.count >= 2, let pages = Int(String(decoding: fields[1], as: UTF8.self)) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
