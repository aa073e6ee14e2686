import SigilRPC
import NIOCore
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The credentials the kernel recorded for the peer of a Unix socket when it called `connect(2)`
/// (`SO_PEERCRED`). Nothing here comes from the client: it cannot choose or fake these values.
public struct PeerCredentials: Sendable, Hashable, CustomStringConvertible {
    /// The caller's process ID at connect time (0 when the caller is in a PID namespace the agent cannot see).
    public let pid: Int32
    /// The caller's effective user ID at connect time.
    public let uid: UInt32
    /// The caller's effective group ID at connect time.
    public let gid: UInt32

    public init(pid: Int32, uid: UInt32, gid: UInt32) {
        self.pid = pid
        self.uid = uid
        self.gid = gid
    }

    /// `pid=N uid=N gid=N`, the form used in logs under the `peer` key.
    public var description: String { "pid=\(pid) uid=\(uid) gid=\(gid)" }
}

#if os(Linux)
/// `struct ucred` from `<sys/socket.h>` (Glibc does not export it to Swift): three 32-bit fields, 12 bytes.
struct RawUcred: Sendable {
    var pid: pid_t = 0
    var uid: uid_t = 0
    var gid: gid_t = 0
}
#endif

extension PeerCredentials {
    /// Reads `SO_PEERCRED` from an accepted Unix-socket channel. Fails (never guesses) when the channel is
    /// not a socket that offers socket options or the platform has no `SO_PEERCRED`.
    static func read(from channel: any Channel) -> EventLoopFuture<PeerCredentials> {
        #if os(Linux)
        guard let provider = channel as? any SocketOptionProvider else {
            return channel.eventLoop.makeFailedFuture(
                WorkloadAPIError(.permissionDenied, "the Workload API connection is not a Unix socket whose peer credentials can be read")
            )
        }
        let raw: EventLoopFuture<RawUcred> = provider.unsafeGetSocketOption(
            level: SocketOptionLevel(SOL_SOCKET),
            name: SocketOptionName(SO_PEERCRED)
        )
        return raw.map { PeerCredentials(pid: $0.pid, uid: $0.uid, gid: $0.gid) }
        #else
        return channel.eventLoop.makeFailedFuture(
            WorkloadAPIError(.permissionDenied, "reading a Workload API caller's credentials (SO_PEERCRED) is only supported on Linux")
        )
        #endif
    }
}
