public import GRPCCore
public import ServiceLifecycle

/// A gRPC server as a swift-service-lifecycle `Service`: serves until the group shuts down, then
/// stops accepting and lets in-flight RPCs finish.
public struct GRPCServerService<Transport: ServerTransport>: Service {
    public let server: GRPCServer<Transport>

    public init(_ server: GRPCServer<Transport>) {
        self.server = server
    }

    public func run() async throws {
        try await withGracefulShutdownHandler {
            try await server.serve()
        } onGracefulShutdown: {
            server.beginGracefulShutdown()
        }
    }
}

/// Metadata helpers shared by the services.
extension Metadata {
    /// The first string value for `key`, if any.
    public func firstString(_ key: String) -> String? {
        for value in self[stringValues: key] { return value }
        return nil
    }
}
