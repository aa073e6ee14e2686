import Foundation
import Testing
@testable import SigilProxy

/// Dropping a page that holds a private copy (a relocation, a write) would lose it: only clean,
/// read-only, private, file-backed mappings may be given back. Serialized: two tests drop this
/// process's pages and count what is present.
@Suite(.serialized)
struct ProcessMemoryTests {
    static let smaps = """
        55d0a0000000-55d0a0400000 r--p 00000000 08:01 1234 /usr/local/bin/sigil-proxy
        Size:               4096 kB
        Rss:                1024 kB
        Anonymous:             0 kB
        VmFlags: rd mr mw me
        55d0a0400000-55d0a1400000 r-xp 00400000 08:01 1234 /usr/local/bin/sigil-proxy
        Size:              16384 kB
        Anonymous:             0 kB
        55d0a1400000-55d0a1600000 r--p 01400000 08:01 1234 /usr/local/bin/sigil-proxy
        Size:               2048 kB
        Anonymous:          1980 kB
        55d0a1600000-55d0a1700000 rw-p 01600000 08:01 1234 /usr/local/bin/sigil-proxy
        Anonymous:             0 kB
        7f00a0000000-7f00a0100000 rw-p 00000000 00:00 0
        Anonymous:           512 kB
        7f00b0000000-7f00b0020000 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
        Anonymous:             0 kB
        7f00b0020000-7f00b0021000 r--s 00000000 08:01 77 /dev/shm/shared
        Anonymous:             0 kB
        7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
        Anonymous:           132 kB
        ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
        Anonymous:             0 kB

        """

    @Test("only clean read-only private file mappings are dropped")
    func onlyCleanReadOnlyFileMappings() {
        let dropped = ProcessMemory.droppable(smaps: Array(Self.smaps.utf8))
        #expect(dropped == [
            .init(start: 0x55d0_a000_0000, end: 0x55d0_a040_0000),  // rodata, clean
            .init(start: 0x55d0_a040_0000, end: 0x55d0_a140_0000),  // code
            .init(start: 0x7f00_b000_0000, end: 0x7f00_b002_0000),  // libc code
        ])
    }

    @Test("a mapping whose Anonymous line is missing or unreadable is kept")
    func unreadableIsKept() {
        let text = "55d0a0000000-55d0a0400000 r--p 00000000 08:01 1234 /bin/x\nSize: 4 kB\n"
        #expect(ProcessMemory.droppable(smaps: Array(text.utf8)).isEmpty)
    }

    @Test("release() on this process gives back pages and the process keeps running")
    func releaseOnSelf() {
        let advised = ProcessMemory.release()
        #expect(advised > 0)
        // Code and read-only data fault back in: this process goes on running code it dropped.
        #expect(ProcessMemory.droppable(smaps: Array(Self.smaps.utf8)).count == 3)
    }

    @Test("the idle trimmer's CPU clock counts this process's work")
    func cpuClockAdvances() {
        let before = IdleTrimmer.cpuTime()
        var x: UInt64 = 1
        for i in 0..<20_000_000 { x = x &* 6364136223846793005 &+ UInt64(i) }
        #expect(x != 0)
        #expect(IdleTrimmer.cpuTime() > before)
    }

    @Test("the idle trimmer reads this process's resident set")
    func residentSet() {
        let big = [UInt8](repeating: 1, count: 8 << 20)
        #expect(IdleTrimmer.residentBytes() > big.count)
        #expect(big.last == 1)
    }

    // MARK: constant data in the writable segment

    /// Little-endian bytes of `value`, `size` wide.
    static func le(_ value: UInt64, _ size: Int) -> [UInt8] { (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }

    /// A section header: name offset, type, flags, address, size (the rest zero).
    static func section(name: UInt64, type: UInt64, flags: UInt64, addr: UInt64, size: UInt64) -> [UInt8] {
        le(name, 4) + le(type, 4) + le(flags, 8) + le(addr, 8) + le(0, 8) + le(size, 8) + [UInt8](repeating: 0, count: 24)
    }

    /// A program header: type, file offset, address (the rest zero).
    static func program(type: UInt64, offset: UInt64, vaddr: UInt64) -> [UInt8] {
        le(type, 4) + le(0, 4) + le(offset, 8) + le(vaddr, 8) + [UInt8](repeating: 0, count: 32)
    }

    static func elf(sections: [[UInt8]] = [], names: String = "", programs: [[UInt8]] = []) -> ProcessMemory.ELFParts {
        var header = [UInt8](repeating: 0, count: 64)
        header.replaceSubrange(0..<6, with: [0x7F, 0x45, 0x4C, 0x46, 2, 1])
        header.replaceSubrange(32..<40, with: le(64, 8))  // phoff
        header.replaceSubrange(40..<48, with: le(4096, 8))  // shoff
        header.replaceSubrange(54..<56, with: le(56, 2))
        header.replaceSubrange(56..<58, with: le(UInt64(programs.count), 2))
        header.replaceSubrange(58..<60, with: le(64, 2))
        header.replaceSubrange(60..<62, with: le(UInt64(sections.count), 2))
        header.replaceSubrange(62..<64, with: le(0, 2))
        return .init(header: header, programs: programs.flatMap { $0 }, sections: sections.flatMap { $0 }, names: Array(names.utf8))
    }

    @Test("a writable .rodata is found by its exact name and flags; read-only or other sections are not")
    func writableRodata() throws {
        // names: \0.shstrtab\0.rodata\0.rodata.str\0.data\0
        let names = "\0.shstrtab\0.rodata\0.rodata.str\0.data\0"
        let parts = Self.elf(sections: [
            Self.section(name: 1, type: 3, flags: 0, addr: 0, size: 40),  // .shstrtab (index 0 here: e_shstrndx)
            Self.section(name: 11, type: 1, flags: 0x3, addr: 0x2d7f000, size: 0x24f1e8c),  // .rodata, WA
            Self.section(name: 19, type: 1, flags: 0x3, addr: 0x5300000, size: 0x1000),  // .rodata.str: another name
            Self.section(name: 31, type: 1, flags: 0x3, addr: 0x5270ec0, size: 0x6b990),  // .data
            Self.section(name: 11, type: 1, flags: 0x2, addr: 0x1000, size: 0x2000),  // a read-only .rodata: mapping-level rule
            Self.section(name: 11, type: 8, flags: 0x3, addr: 0x9000, size: 0x2000),  // NOBITS
            Self.section(name: 11, type: 1, flags: 0x3, addr: 0x9000_0000, size: (1 << 30) + 1),  // larger than 1 GiB
        ], names: names)
        let found = try #require(ProcessMemory.writableConstantSections(parts))
        #expect(found == [.init(start: 0x2d7f000, end: 0x2d7f000 + 0x24f1e8c)])
        var broken = parts
        broken.header[4] = 1  // 32-bit
        #expect(ProcessMemory.ELFParts.layout(header: broken.header) == nil)
        broken = parts
        broken.names = Array(names.utf8.prefix(12))  // name table cut short: nothing matches, nothing traps
        #expect(try #require(ProcessMemory.writableConstantSections(broken)).isEmpty)
    }

    @Test("only present, file-backed pages are dropped; private copies and absent pages are kept")
    func fileBackedRuns() {
        let present: UInt64 = 1 << 63, file: UInt64 = 1 << 61
        let entries: [UInt64] = [present | file, present | file, present /* a private copy */, 0 /* absent */,
                                 present | file, file /* swapped-out shape: not present */, present | file]
        let runs = ProcessMemory.fileBackedRuns(pagemap: entries, start: 0x10000, pageSize: 0x1000)
        #expect(runs == [.init(start: 0x10000, end: 0x12000), .init(start: 0x14000, end: 0x15000), .init(start: 0x16000, end: 0x17000)])
        #expect(ProcessMemory.fileBackedRuns(pagemap: [present, 0], start: 0, pageSize: 0x1000).isEmpty)
    }

    @Test("the load base is where the kernel put the program headers less where the link put them")
    func loadBase() {
        // A position-independent executable: PT_PHDR at 0x40, loaded at 0x55d0a0000000.
        let pie = Self.elf(programs: [Self.program(type: 6, offset: 0x40, vaddr: 0x40), Self.program(type: 1, offset: 0, vaddr: 0)])
        #expect(ProcessMemory.loadBase(pie, runtimeProgramHeaders: 0x55d0_a000_0040) == 0x55d0_a000_0000)
        // A fixed-address one without PT_PHDR: the headers sit at phoff (64) in the segment at offset 0.
        let fixed = Self.elf(programs: [Self.program(type: 1, offset: 0x1000, vaddr: 0x401000), Self.program(type: 1, offset: 0, vaddr: 0x400000)])
        #expect(ProcessMemory.loadBase(fixed, runtimeProgramHeaders: 0x400040) == 0)
        // Headers that say neither, a run-time address below the link-time one, or no AT_PHDR: nil.
        #expect(ProcessMemory.loadBase(Self.elf(programs: [Self.program(type: 1, offset: 0x1000, vaddr: 0x401000)]), runtimeProgramHeaders: 0x400040) == nil)
        #expect(ProcessMemory.loadBase(fixed, runtimeProgramHeaders: 0x1000) == nil)
        #expect(ProcessMemory.loadBase(pie, runtimeProgramHeaders: 0) == nil)
    }

    @Test("on this process the writable-constant pass finds read pages of .rodata and drops them")
    func constantPagesOnSelf() throws {
        // Swift executables (this test binary too) carry a writable .rodata; start-up has read
        // some of it. Dropping those pages must leave fewer present, and the process running.
        // Where the section is, found another way: the executable's mapping at file offset 0 in
        // /proc/self/maps (a position-independent executable links its first segment at 0).
        let parts = try #require(ProcessMemory.ownExecutable())
        let sections = try #require(ProcessMemory.writableConstantSections(parts))
        guard !sections.isEmpty else { return }  // a link without a writable .rodata: nothing to drop
        let maps = String(decoding: try #require(FileManager.default.contents(atPath: "/proc/self/maps")), as: UTF8.self)
        let exe = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
        let line = try #require(maps.split(separator: "\n").first { $0.hasSuffix(" " + exe) && $0.split(separator: " ")[2] == "00000000" })
        let base = try #require(UInt(line.prefix { $0 != "-" }, radix: 16))
        let inside = sections.map { ProcessMemory.Mapping(start: base + $0.start, end: base + $0.end) }
        func clean() throws -> Int {
            let runs = ProcessMemory.cleanConstantPages()
            for run in runs {
                #expect(run.end > run.start && run.start % 4096 == 0 && run.end % 4096 == 0)
                #expect(inside.contains { $0.start <= run.start && run.end <= $0.end }, "run \(run) outside .rodata \(inside)")
            }
            return runs.reduce(0) { $0 + Int($1.end - $1.start) }
        }
        let before = try clean()
        #expect(before > 0)
        #expect(ProcessMemory.release() >= before)
        // Other suites run in parallel in this process and fault pages back in: the recount may
        // lose that race once, not three times running.
        var after = try clean()
        for _ in 0..<2 where after >= before {
            ProcessMemory.release()
            after = try clean()
        }
        #expect(after < before)
    }
}
