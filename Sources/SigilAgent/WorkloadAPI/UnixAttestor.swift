public import SigilRPC
#if canImport(CoreFoundation)
import CoreFoundation  // where the release build looks for timespec on Linux
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// What the Unix attestor established about one Workload API caller.
public struct WorkloadAttestation: Sendable, Hashable {
    /// The kernel's record of the caller (`SO_PEERCRED`, taken when it connected).
    public let credentials: PeerCredentials
    /// The caller's selectors, sorted and without duplicates (`unix:uid:1000`, `unix:path:/usr/bin/web`, ...).
    public let selectors: [String]

    public init(credentials: PeerCredentials, selectors: [String]) {
        self.credentials = credentials
        self.selectors = Array(Set(selectors)).sorted()
    }
}

/// The `unix` workload attestor: turns a caller's kernel credentials into selectors, as SPIRE's
/// `unix` plugin does.
///
/// - `unix:uid:N`, `unix:gid:N` from `SO_PEERCRED` (the effective IDs at connect time);
/// - `unix:user:NAME`, `unix:group:NAME` when the IDs have names (`getpwuid_r`, `getgrgid_r`);
/// - `unix:supplementary_gid:N` and `unix:supplementary_group:NAME` from `/proc/<pid>/status`;
/// - `unix:path:/abs/exe` from `/proc/<pid>/exe` when the agent may read it and it is valid UTF-8.
///
/// The optional selectors are only ever left out, never guessed: an entry matches when all of its
/// selectors are among the caller's, so a missing selector can only deny.
///
/// PID reuse: the PID from `SO_PEERCRED` may belong to another process by the time `/proc` is read.
/// The attestor refuses when the process started after the connection was accepted, when its start
/// time changes while it is read, or when its real uid is not the uid it connected with.
public struct UnixWorkloadAttestor: Sendable {
    /// Where procfs is mounted (tests may point elsewhere).
    public let procRoot: String

    public init(procRoot: String = "/proc") {
        self.procRoot = procRoot
    }

    /// Attests a caller. Throws `WorkloadAPIError` `.permissionDenied` with the reason when the caller's
    /// process cannot be tied to the connection.
    public func attest(_ credentials: PeerCredentials) throws(WorkloadAPIError) -> WorkloadAttestation {
        try attest(credentials, acceptedAt: nil)
    }

    /// - Parameter acceptedAt: `CLOCK_BOOTTIME` when the connection was accepted; a process that started
    ///   later cannot be the one that connected.
    func attest(_ credentials: PeerCredentials, acceptedAt: BootTime?) throws(WorkloadAPIError) -> WorkloadAttestation {
        let pid = credentials.pid
        guard pid > 0 else {
            throw denied("the caller's process is not visible to the agent (SO_PEERCRED pid \(pid)): run the agent in the host PID namespace or in the caller's")
        }
        let processDir = "\(procRoot)/\(pid)"

        let startBefore = try startTime(processDir, pid: pid)
        if let acceptedAt, let ticks = BootTime.clockTicksPerSecond {
            // /proc reports the start time truncated to whole clock ticks since boot, so the real
            // caller always satisfies start <= accepted; a later start means the PID was reused.
            if startBefore.multipliedReportingOverflow(by: 1_000_000_000 / ticks).partialValue > acceptedAt.nanoseconds {
                throw denied("process \(pid) started after its connection was accepted, so the PID was reused; reconnect")
            }
        }

        guard let status = ProcFile.contents("\(processDir)/status") else {
            throw denied("process \(pid) exited before it could be attested; reconnect while it runs")
        }
        let parsed = ProcStatus(status)
        guard let realUID = parsed.realUID else {
            throw denied("cannot read the real uid of process \(pid) from \(processDir)/status")
        }
        guard realUID == credentials.uid else {
            throw denied("process \(pid) has real uid \(realUID) but connected with uid \(credentials.uid) (a setuid program, or the PID was reused); the Workload API serves only callers whose real and connecting uid agree")
        }
        let executable = ProcFile.readLink("\(processDir)/exe")

        let startAfter = try startTime(processDir, pid: pid)
        guard startAfter == startBefore else {
            throw denied("process \(pid) was replaced while it was being attested (PID reuse); reconnect")
        }

        var selectors = [
            "unix:uid:\(credentials.uid)",
            "unix:gid:\(credentials.gid)",
        ]
        if let user = NameLookup.userName(credentials.uid) {
            selectors.append("unix:user:\(user)")
        }
        if let group = NameLookup.groupName(credentials.gid) {
            selectors.append("unix:group:\(group)")
        }
        for gid in parsed.supplementaryGIDs {
            selectors.append("unix:supplementary_gid:\(gid)")
            if let group = NameLookup.groupName(gid) {
                selectors.append("unix:supplementary_group:\(group)")
            }
        }
        if let executable, executable.hasPrefix("/") {
            selectors.append("unix:path:\(executable)")
        }
        return WorkloadAttestation(credentials: credentials, selectors: selectors)
    }

    private func startTime(_ processDir: String, pid: Int32) throws(WorkloadAPIError) -> UInt64 {
        guard let stat = ProcFile.contents("\(processDir)/stat") else {
            throw denied("process \(pid) exited before it could be attested; reconnect while it runs")
        }
        guard let start = ProcStat.startTime(stat) else {
            throw denied("cannot read the start time of process \(pid) from \(processDir)/stat")
        }
        return start
    }

    private func denied(_ message: String) -> WorkloadAPIError {
        WorkloadAPIError(.permissionDenied, "workload attestation failed: \(message)")
    }
}

/// A reading of `CLOCK_BOOTTIME` (the clock `/proc/<pid>/stat` start times count on).
struct BootTime: Sendable, Hashable {
    let nanoseconds: UInt64

    static func now() -> BootTime? {
        #if os(Linux)
        var ts = timespec()
        guard clock_gettime(CLOCK_BOOTTIME, &ts) == 0 else { return nil }
        return BootTime(nanoseconds: UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec))
        #else
        return nil
        #endif
    }

    /// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat` times; nil if unknown.
    static let clockTicksPerSecond: UInt64? = {
        let ticks = sysconf(Int32(_SC_CLK_TCK))
        guard ticks > 0, ticks <= 1_000_000_000 else { return nil }
        return UInt64(ticks)
    }()
}

/// Small procfs readers (procfs files report size 0, so read to EOF).
enum ProcFile {
    static func contents(_ path: String, limit: Int = 1 << 16) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while bytes.count < limit {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                return nil
            }
            if n == 0 { break }
            bytes.append(contentsOf: chunk[0..<n])
        }
        return String(validating: bytes, as: UTF8.self) ?? String(decoding: bytes, as: UTF8.self)
    }

    /// The target of a symbolic link, or nil if unreadable, truncated, or not valid UTF-8.
    static func readLink(_ path: String) -> String? {
        let capacity = Int(PATH_MAX) + 1
        var buffer = [UInt8](repeating: 0, count: capacity)
        let n = buffer.withUnsafeMutableBufferPointer { pointer in
            pointer.withMemoryRebound(to: CChar.self) { chars -> Int in
                guard let base = chars.baseAddress else { return -1 }
                return readlink(path, base, capacity)
            }
        }
        guard n > 0, n < capacity else { return nil }
        return String(validating: buffer[0..<n], as: UTF8.self)
    }
}

enum ProcStat {
    /// Field 22 of `/proc/<pid>/stat` (start time in clock ticks after boot). The command name
    /// (field 2) may hold spaces and parentheses, so counting starts after the last `)`.
    static func startTime(_ stat: String) -> UInt64? {
        guard let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(whereSeparator: { $0 == " " || $0 == "\n" })
        // fields[0] is field 3 (state), so field 22 is fields[19].
        guard fields.count > 19 else { return nil }
        return UInt64(fields[19])
    }
}

struct ProcStatus {
    var realUID: UInt32?
    var supplementaryGIDs: [UInt32] = []

    init(_ status: String) {
        for line in status.split(separator: "\n") {
            if line.hasPrefix("Uid:") {
                let ids = line.dropFirst(4).split(whereSeparator: { $0 == " " || $0 == "\t" })
                realUID = ids.first.flatMap { UInt32($0) }
            } else if line.hasPrefix("Groups:") {
                supplementaryGIDs = line.dropFirst(7)
                    .split(whereSeparator: { $0 == " " || $0 == "\t" })
                    .compactMap { UInt32($0) }
            }
        }
    }
}

/// User and group names through NSS (`getpwuid_r` / `getgrgid_r`).
enum NameLookup {
    static func userName(_ uid: UInt32) -> String? {
        lookup(initial: sysconf(Int32(_SC_GETPW_R_SIZE_MAX))) { buffer in
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>?
            guard let base = buffer.baseAddress else { return .none }
            let rc = getpwuid_r(uid_t(uid), &entry, base, buffer.count, &result)
            guard rc == 0 else { return .failed(rc) }
            guard let result, let name = result.pointee.pw_name else { return .none }
            return .found(String(validatingCString: name))
        }
    }

    static func groupName(_ gid: UInt32) -> String? {
        lookup(initial: sysconf(Int32(_SC_GETGR_R_SIZE_MAX))) { buffer in
            var entry = group()
            var result: UnsafeMutablePointer<group>?
            guard let base = buffer.baseAddress else { return .none }
            let rc = getgrgid_r(gid_t(gid), &entry, base, buffer.count, &result)
            guard rc == 0 else { return .failed(rc) }
            guard let result, let name = result.pointee.gr_name else { return .none }
            return .found(String(validatingCString: name))
        }
    }

    private enum Outcome {
        case found(String?)
        case none
        case failed(Int32)
    }

    private static func lookup(initial: Int, _ body: (UnsafeMutableBufferPointer<CChar>) -> Outcome) -> String? {
        var size = initial > 0 ? initial : 1024
        while size <= 1 << 20 {
            var buffer = [CChar](repeating: 0, count: size)
            // The name points into `buffer`: copy it out inside the closure.
            let outcome = buffer.withUnsafeMutableBufferPointer { body($0) }
            switch outcome {
            case .found(let name):
                guard let name, !name.isEmpty else { return nil }
                return name
            case .none:
                return nil
            case .failed(let rc):
                guard rc == ERANGE else { return nil }
                size *= 2
            }
        }
        return nil
    }
}
