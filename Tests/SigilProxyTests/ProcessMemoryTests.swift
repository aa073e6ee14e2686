import Testing
@testable import SigilProxy

/// Dropping a page that holds a private copy (a relocation, a write) would lose it: only clean,
/// read-only, private, file-backed mappings may be given back.
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
}
