public import GRPCCore
public import GRPCNIOTransportHTTP2

/// Runs `body` with an admin API client on the server's Unix socket.
public func withAdminClient<Result: Sendable>(
    socketPath: String,
    _ body: @Sendable (SigilAdminAPI.Client<HTTP2ClientTransport.Posix>) async throws -> Result
) async throws -> Result {
    let transport = try HTTP2ClientTransport.Posix(
        target: .unixDomainSocket(path: socketPath),
        transportSecurity: .plaintext,
        config: .defaults { $0.backoff = .init(initial: .milliseconds(100), max: .milliseconds(500), multiplier: 1.6, jitter: 0.2) })
    return try await withGRPCClient(transport: transport) { grpc in
        try await body(SigilAdminAPI.Client(wrapping: grpc))
    }
}

/// Call options for one-shot admin calls: fail fast when the server is not there.
public var adminCallOptions: CallOptions {
    var options = CallOptions.defaults
    options.timeout = .seconds(10)
    options.waitForReady = false
    return options
}
