#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
public import GRPCNIOTransportHTTP2

/// Where a client finds the Sigil server (`--server`, `--ledger-server` HOST:PORT): an IPv4
/// literal, an IPv6 literal (written `[::1]:8081` on the command line) or a DNS name, resolved
/// when connecting, as spire-agent's `server_address` is.
public enum ServerTarget {
    public static func resolvable(host: String, port: Int) -> any ResolvableTarget {
        if isIPv4(host) { return ResolvableTargets.IPv4.ipv4(address: host, port: port) }
        if isIPv6(host) { return ResolvableTargets.IPv6.ipv6(address: host, port: port) }
        return ResolvableTargets.DNS.dns(host: host, port: port)
    }

    public static func isIPv4(_ host: String) -> Bool {
        var address = in_addr()
        return inet_pton(AF_INET, host, &address) == 1
    }

    public static func isIPv6(_ host: String) -> Bool {
        var address = in6_addr()
        return inet_pton(AF_INET6, host, &address) == 1
    }

    /// Why `host` cannot name a server, or nil: empty, or characters no DNS name or IP literal has.
    public static func problem(host: String) -> String? {
        if host.isEmpty { return "the host is empty" }
        if isIPv4(host) || isIPv6(host) { return nil }
        let allowed = host.utf8.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x41 && b <= 0x5A) || (b >= 0x30 && b <= 0x39) || b == 0x2D || b == 0x2E || b == 0x5F
        }
        guard allowed, host.utf8.count <= 253, !host.hasPrefix("."), !host.hasPrefix("-") else {
            return "'\(host)' is neither an IP address nor a DNS name"
        }
        return nil
    }
}
