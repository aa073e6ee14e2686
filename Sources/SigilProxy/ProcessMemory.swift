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
        guard let text = smaps() else { return 0 }
        var advised = 0
        for mapping in droppable(smaps: text) + cleanConstantPages() {
            if madvise(UnsafeMutableRawPointer(bitPattern: mapping.start), Int(mapping.end - mapping.start), MADV_DONTNEED) == 0 {
                advised += Int(mapping.end - mapping.start)
            }
        }
        trimHeap()
        return advised
    }

    /// `/proc/self/smaps`, or nil if it cannot be read.
    static func smaps() -> [UInt8]? {
        guard let file = fopen("/proc/self/smaps", "r") else { return nil }
        defer { fclose(file) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65_536)
        while true {
            let n = chunk.withUnsafeMutableBytes { fread($0.baseAddress, 1, $0.count, file) }
            if n <= 0 { break }
            text.append(contentsOf: chunk[0..<n])
        }
        return text
    }

    // MARK: constant data in the executable's writable segment

    /// The pages of the executable's writable constant data that are still the file's own.
    ///
    /// A static Swift executable links ICU's data (~34 MB, `icudt*_dat`), BoringSSL's tables and
    /// the standard library's Unicode tables into `.rodata`; some of the Swift compiler's constant
    /// metadata inputs to that section are marked writable (they carry link-time relocations), so
    /// the linker makes the whole output section writable and puts it in the read-write segment
    /// beside `.data` and `.bss` (the executable has no dynamic relocation into it: nothing writes
    /// it at run time). That mapping then has anonymous pages, the mapping-level rule above never
    /// drops it, and the ~3 MB that start-up read stay resident. This looks at that section's whole
    /// pages only (a page shared with `.data` is never touched) and, page by page in
    /// `/proc/self/pagemap`, keeps every page that is not present or not file-backed (a private
    /// copy made by a write), so what is dropped is byte-for-byte the file's and faults back in on
    /// use. Empty when anything cannot be read.
    ///
    /// This relies on nothing writing that section after start-up (it holds constants; the
    /// executable has no dynamic relocation into it): a first write by another thread between the
    /// pagemap read and the `madvise` would make a private copy that the `madvise` then discards.
    static func cleanConstantPages() -> [Mapping] {
        guard let ranges = loadedConstantSections, !ranges.isEmpty else { return [] }
        let pageSize = sysconf(Int32(_SC_PAGESIZE))
        guard pageSize > 0 else { return [] }
        let page = UInt(pageSize)
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var result: [Mapping] = []
        for section in ranges {
            // Whole pages inside the section only.
            // (Addresses are user-space ones, below 2^47, and a section is at most 1 GiB: no overflow.)
            let first = (section.start + page - 1) / page * page
            let end = section.end / page * page
            guard end > first else { continue }
            let count = Int((end - first) / page)
            var entries = [UInt64](repeating: 0, count: count)
            let wanted = count * 8
            let n = entries.withUnsafeMutableBytes { pread(fd, $0.baseAddress, wanted, off_t(first / page * 8)) }
            guard n == wanted else { continue }
            result += fileBackedRuns(pagemap: entries, start: first, pageSize: page)
        }
        return result
    }

    /// Runs of pages that are present and file-backed (`/proc/self/pagemap` bits 63 and 61), for
    /// entries of consecutive pages from `start`.
    static func fileBackedRuns(pagemap entries: [UInt64], start: UInt, pageSize: UInt) -> [Mapping] {
        var runs: [Mapping] = []
        var runStart: UInt?
        for (i, entry) in entries.enumerated() {
            let address = start + UInt(i) * pageSize
            let clean = entry & (1 << 63) != 0 && entry & (1 << 61) != 0
            if clean, runStart == nil { runStart = address }
            if !clean, let s = runStart {
                runs.append(Mapping(start: s, end: address))
                runStart = nil
            }
        }
        if let s = runStart { runs.append(Mapping(start: s, end: start + UInt(entries.count) * pageSize)) }
        return runs
    }

    /// The parts of an ELF64 little-endian file that say where its sections are.
    struct ELFParts {
        /// The file header (64 bytes).
        var header: [UInt8]
        /// The program headers (`e_phnum` entries of `e_phentsize` bytes).
        var programs: [UInt8]
        /// The section headers (`e_shnum` entries of `e_shentsize` bytes).
        var sections: [UInt8]
        /// The section-name string table.
        var names: [UInt8]

        /// The little-endian unsigned integer of `width` bytes at `at`; nil past the end.
        static func uint(_ b: [UInt8], _ at: Int, width: Int) -> UInt64? {
            guard at >= 0, at + width <= b.count else { return nil }
            return (0..<width).reduce(UInt64(0)) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) }
        }
        static func u16(_ b: [UInt8], _ at: Int) -> Int? { uint(b, at, width: 2).map(Int.init) }
        static func u32(_ b: [UInt8], _ at: Int) -> UInt64? { uint(b, at, width: 4) }
        static func u64(_ b: [UInt8], _ at: Int) -> UInt64? { uint(b, at, width: 8) }

        /// Where the header puts the program headers, the section headers and the name table's
        /// section header: (offset, size) pairs; nil for anything but an ELF64 little-endian file.
        static func layout(header: [UInt8]) -> (programs: (Int, Int), sections: (Int, Int), namesHeader: Int)? {
            guard header.count >= 64, header[0] == 0x7F, header[1] == 0x45, header[2] == 0x4C, header[3] == 0x46,
                  header[4] == 2 /* 64-bit */, header[5] == 1 /* little-endian */,
                  let phoff = u64(header, 32), let shoff = u64(header, 40), let phentsize = u16(header, 54),
                  let phnum = u16(header, 56), let shentsize = u16(header, 58), let shnum = u16(header, 60),
                  let shstrndx = u16(header, 62), phentsize >= 56, shentsize >= 64, shstrndx < shnum,
                  phoff < 1 << 40, shoff < 1 << 40 else { return nil }
            return ((Int(phoff), phentsize * phnum), (Int(shoff), shentsize * shnum), shstrndx * shentsize)
        }
    }

    /// The writable `.rodata` sections at their run-time addresses, read from the executable once
    /// (its headers and load address do not change while it runs); nil if they cannot be read.
    private static let loadedConstantSections: [Mapping]? = {
        guard let exe = ownExecutable(), let ranges = writableConstantSections(exe),
              let auxiliary = libcFunction("getauxval", as: (@convention(c) (UInt) -> UInt).self),
              let base = loadBase(exe, runtimeProgramHeaders: auxiliary(3 /* AT_PHDR */)) else { return nil }
        return ranges.map { Mapping(start: base + $0.start, end: base + $0.end) }
    }()

    /// The largest section this looks at (1 GiB): its pagemap entries are read in one go.
    static let largestSection: UInt64 = 1 << 30

    /// The writable `.rodata` sections of an executable (link-time addresses, `start..<end`); nil if
    /// the parts do not hold what they should.
    static func writableConstantSections(_ elf: ELFParts) -> [Mapping]? {
        guard let shentsize = ELFParts.u16(elf.header, 58), shentsize >= 64 else { return nil }
        let rodata = Array(".rodata".utf8)
        var ranges: [Mapping] = []
        var at = 0
        while at + shentsize <= elf.sections.count {
            defer { at += shentsize }
            guard let name = ELFParts.u32(elf.sections, at), let type = ELFParts.u32(elf.sections, at + 4),
                  let flags = ELFParts.u64(elf.sections, at + 8), let addr = ELFParts.u64(elf.sections, at + 16),
                  let size = ELFParts.u64(elf.sections, at + 32) else { continue }
            // PROGBITS, SHF_WRITE and SHF_ALLOC, named exactly `.rodata`.
            guard type == 1, flags & 0x3 == 0x3, size > 0, addr < 1 << 62, size <= largestSection else { continue }
            let from = Int(name)
            guard name < UInt64(elf.names.count), from + rodata.count < elf.names.count,
                  Array(elf.names[from..<(from + rodata.count)]) == rodata, elf.names[from + rodata.count] == 0 else { continue }
            ranges.append(Mapping(start: UInt(addr), end: UInt(addr + size)))
        }
        return ranges
    }

    /// Where the executable is loaded: the run-time address of its program headers (the kernel's
    /// `AT_PHDR`) less their link-time address (the `PT_PHDR` segment's, or else where the first
    /// loadable segment that starts at file offset 0 puts them). Zero for a fixed-address
    /// executable; nil if the headers say neither or the addresses do not fit.
    static func loadBase(_ elf: ELFParts, runtimeProgramHeaders: UInt) -> UInt? {
        guard runtimeProgramHeaders != 0, let entry = ELFParts.u16(elf.header, 54), entry >= 56,
              let phoff = ELFParts.u64(elf.header, 32) else { return nil }
        var linked: UInt64?
        var firstLoadAtZero: UInt64?
        var at = 0
        while at + entry <= elf.programs.count {
            defer { at += entry }
            guard let type = ELFParts.u32(elf.programs, at), let offset = ELFParts.u64(elf.programs, at + 8),
                  let vaddr = ELFParts.u64(elf.programs, at + 16) else { continue }
            if type == 6 /* PT_PHDR */ { linked = vaddr }
            if type == 1 /* PT_LOAD */, offset == 0, firstLoadAtZero == nil { firstLoadAtZero = vaddr &+ phoff }
        }
        guard let address = linked ?? firstLoadAtZero, address <= UInt64(runtimeProgramHeaders) else { return nil }
        return runtimeProgramHeaders - UInt(address)
    }

    /// The parts of this process's executable that say where its sections are.
    static func ownExecutable() -> ELFParts? {
        let fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        func read(_ range: (offset: Int, size: Int)) -> [UInt8]? {
            guard range.size >= 0, range.size < 1 << 24 else { return nil }
            var bytes = [UInt8](repeating: 0, count: range.size)
            let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, range.size, off_t(range.offset)) }
            return n == range.size ? bytes : nil
        }
        guard let header = read((0, 64)), let layout = ELFParts.layout(header: header),
              let programs = read(layout.programs), let sections = read(layout.sections),
              let namesOffset = ELFParts.u64(sections, layout.namesHeader + 24),
              let namesSize = ELFParts.u64(sections, layout.namesHeader + 32), namesOffset < 1 << 40, namesSize < 1 << 24,
              let names = read((Int(namesOffset), Int(namesSize))) else { return nil }
        return ELFParts(header: header, programs: programs, sections: sections, names: names)
    }

    /// One malloc arena for the whole process (glibc's `mallopt(M_ARENA_MAX, 1)`), unless the
    /// operator set `MALLOC_ARENA_MAX`. Per-thread arenas keep what a burst freed spread over
    /// several heaps that `malloc_trim` cannot shrink (measured: 14.5 MB private memory after a
    /// 64-connection burst with the default, 6 MB with one arena); glibc's per-thread caches keep
    /// small allocations off the arena lock.
    static func useOneArena() {
        guard getenv("MALLOC_ARENA_MAX") == nil else { return }
        _ = libcFunction("mallopt", as: (@convention(c) (Int32, Int32) -> Int32).self)?(-8 /* M_ARENA_MAX */, 1)
    }

    /// glibc's `malloc_trim(0)`.
    static func trimHeap() {
        _ = mallocTrim?(0)
    }

    /// Looked up once: a lookup per trim would run the dynamic linker's symbol search again, and
    /// fault its code back in, right after the trim dropped it.
    private static let mallocTrim = libcFunction("malloc_trim", as: (@convention(c) (Int) -> Int32).self)

    /// A C library function looked up at run time: Swift's Glibc module does not export
    /// `<malloc.h>` or `<sys/auxv.h>`, and other C libraries may have no such calls (then nil:
    /// nothing is done).
    static func libcFunction<F>(_ name: String, as type: F.Type) -> F? {
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
        var settling = false
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            let now = Self.cpuTime()
            let used = now - last
            last = now
            if settling {
                // An idle interval after a trim: what its timers faulted back in (a few hundred KB
                // of code) is the idle working set, not growth, or every interval would trim again.
                settling = false
                // Only a small rise counts as that: a burst (a large transfer uses little CPU) in
                // this interval leaves the floor alone, and the next idle interval trims it.
                let resident = Self.residentBytes()
                if used < idleCPU, resident <= floor + growth { floor = max(floor, resident) }
                continue
            }
            guard used < idleCPU, Self.residentBytes() > floor + growth else { continue }
            ProcessMemory.release()
            floor = Self.residentBytes()
            settling = true
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
