public import SigilCore
public import SigilStore
public import Logging
public import ServiceLifecycle
import NIOCore
import NIOPosix
import NIOHTTP1
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Where `sigil server run --ui` serves the ledger page: a loopback address only, because the page
/// has no authentication (reach it from elsewhere through `ssh -L`).
public struct LedgerUIAddress: Sendable, Equatable, CustomStringConvertible {
    public let host: String
    public let port: Int

    /// Reads `HOST:PORT` (`127.0.0.1:8088`, `[::1]:8088`, `localhost:8088`) and refuses any host
    /// outside 127.0.0.0/8 and ::1.
    public init(parsing text: String) throws(ServerError) {
        guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
            throw ServerError(message: "--ui '\(text)' must be HOST:PORT on loopback, e.g. 127.0.0.1:8088")
        }
        var host = String(text[..<colon])
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host == "localhost" { host = "127.0.0.1" }
        guard Self.isLoopback(host) else {
            throw ServerError(message: "--ui '\(text)': the ledger page has no authentication, so it listens only on loopback (127.0.0.0/8 or [::1]); use e.g. --ui 127.0.0.1:\(port) and reach it from elsewhere with ssh -L")
        }
        self.host = host
        self.port = port
    }

    /// Whether `host` is an IPv4 address in 127.0.0.0/8 or the IPv6 address ::1 (names are not).
    static func isLoopback(_ host: String) -> Bool {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 {
            return UInt32(bigEndian: v4.s_addr) >> 24 == 127
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 {
            return withUnsafeBytes(of: &v6) { bytes in bytes.prefix(15).allSatisfy { $0 == 0 } && bytes[15] == 1 }
        }
        return false
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

/// One answer of the ledger page.
struct LedgerUIResponse: Sendable {
    var status: Int
    var contentType: String
    var body: [UInt8]
    var allow: String?

    static func text(_ status: Int, _ message: String) -> LedgerUIResponse {
        LedgerUIResponse(status: status, contentType: "text/plain; charset=utf-8", body: Array((message + "\n").utf8))
    }
}

/// The ledger page's routes over the server's store: `GET /ui` (HTML), `GET /ui/graph.json` (edges),
/// `GET /ui/rows.json` (rows), read-only; HEAD too.
struct LedgerUI: Sendable {
    let store: any LedgerStore
    let clock: any SigilClock
    let logger: Logger
    /// Checks retention checkpoints' signatures (nil: not checked).
    var checkpointKey: LedgerCheckpointKey? = nil
    /// The whole-ledger check the page shows, shared by its loads (see ``LedgerVerificationCache``).
    var verifications = LedgerVerificationCache()

    /// Answers one request; never throws (a store failure is a 500 that says so).
    func respond(method: String, uri: String, host: String?) async -> LedgerUIResponse {
        guard method == "GET" || method == "HEAD" else {
            var response = LedgerUIResponse.text(405, "the ledger page is read-only: only GET and HEAD are allowed")
            response.allow = "GET, HEAD"
            return response
        }
        if let host, !Self.isLoopbackHost(host) {
            // A page on another site that re-points its name at 127.0.0.1 (DNS rebinding) sends its own name.
            return .text(403, "the Host header '\(host)' is not a loopback address; open the page as http://127.0.0.1:<port>/ui")
        }
        let path: Substring, rawQuery: Substring
        if let mark = uri.firstIndex(of: "?") {
            path = uri[..<mark]
            rawQuery = uri[uri.index(after: mark)...]
        } else {
            path = uri[...]
            rawQuery = ""
        }
        let route: Route
        switch path {
        case "/ui", "/ui/": route = .page
        case "/ui/graph.json": route = .graph
        case "/ui/rows.json": route = .rows
        default: return .text(404, "no such page: the ledger page is /ui (data: /ui/graph.json, /ui/rows.json)")
        }
        let now = clock.now
        let nowMicros = Int64((now.timeIntervalSince1970 * 1_000_000).rounded())
        let query: LedgerPageQuery
        do {
            query = try LedgerPageQuery.parse(rawQuery, nowMicros: nowMicros)
        } catch {
            if route == .page {
                return LedgerUIResponse(status: 400, contentType: "text/html; charset=utf-8", body: Array(LedgerPage.badRequest(error.message).utf8))
            }
            return .text(400, error.message)
        }
        do {
            switch route {
            case .page:
                let edges = try await store.ledgerEdges(sinceMicros: query.sinceMicros, untilMicros: query.untilMicros).filter(query.keeps)
                let rows = try await store.ledgerRows(query.ledgerQuery)
                let (store, key) = (store, checkpointKey)
                let (verification, checkedAt) = try await verifications.verification(now: now) {
                    try await store.verifyLedger(checkpointKey: key)
                }
                let html = LedgerPage.render(query: query, edges: edges, rows: rows, verification: verification, nowMicros: nowMicros,
                                             checkedMicros: Int64((checkedAt.timeIntervalSince1970 * 1_000_000).rounded()))
                return LedgerUIResponse(status: 200, contentType: "text/html; charset=utf-8", body: Array(html.utf8))
            case .graph:
                let edges = try await store.ledgerEdges(sinceMicros: query.sinceMicros, untilMicros: query.untilMicros).filter(query.keeps)
                return LedgerUIResponse(status: 200, contentType: "application/json", body: try LedgerGraph(edges: edges).json())
            case .rows:
                let rows = try await store.ledgerRows(query.ledgerQuery)
                // The rows exactly as their writers chained them (hashes included), oldest first.
                var body = Array("{\"count\":\(rows.count),\"rows\":[".utf8)
                for (index, row) in rows.enumerated() {
                    if index > 0 { body.append(UInt8(ascii: ",")) }
                    body += row.line
                }
                body += Array("]}".utf8)
                return LedgerUIResponse(status: 200, contentType: "application/json", body: body)
            }
        } catch let error as StoreError {
            logger.error("ledger page: datastore failed", metadata: ["error": "\(error.message)"])
            return .text(500, "the datastore failed: \(error.message)")
        } catch {
            logger.error("ledger page failed", metadata: ["error": "\(error)"])
            return .text(500, "the ledger page failed: \(error)")
        }
    }

    enum Route { case page, graph, rows }

    /// `127.0.0.1`, `127.x.y.z`, `localhost`, `[::1]`, each with an optional port.
    static func isLoopbackHost(_ header: String) -> Bool {
        var host = header.trimmingCharacters(in: .whitespaces)
        if host.hasPrefix("[") {
            guard let end = host.firstIndex(of: "]") else { return false }
            host = String(host[host.index(after: host.startIndex)..<end])
        } else if let colon = host.lastIndex(of: ":") {
            host = String(host[..<colon])
        }
        return host.lowercased() == "localhost" || LedgerUIAddress.isLoopback(host)
    }
}

/// `sigil audit verify`'s whole-ledger check as the page shows it. It reads every stored row, so
/// the page does not run it per load: a result is reused for ``maxAge`` (the page says when it
/// was checked), and loads that arrive while a check runs wait for that one instead of starting
/// their own. Before, every load (and every reload of an open tab) re-read the whole ledger.
actor LedgerVerificationCache {
    static let maxAge: TimeInterval = 30
    private var last: (verification: LedgerVerification, at: Date)?
    private var running: Task<LedgerVerification, any Error>?

    func verification(now: Date, compute: @escaping @Sendable () async throws -> LedgerVerification) async throws -> (LedgerVerification, Date) {
        if let last, now.timeIntervalSince(last.at) < Self.maxAge, now >= last.at { return last }
        let task: Task<LedgerVerification, any Error>
        if let running {
            task = running
        } else {
            task = Task { try await compute() }
            running = task
        }
        defer { if running == task { running = nil } }
        let verification = try await task.value
        last = (verification, now)
        return (verification, now)
    }
}

/// The ledger page's listener: plain HTTP/1.1 on loopback (SwiftNIO), a swift-service-lifecycle
/// service that stops on graceful shutdown.
public struct LedgerUIServer: Service {
    let address: LedgerUIAddress
    let ui: LedgerUI

    public init(address: LedgerUIAddress, store: any LedgerStore, clock: any SigilClock, logger: Logger, checkpointKey: LedgerCheckpointKey? = nil) {
        self.address = address
        self.ui = LedgerUI(store: store, clock: clock, logger: logger, checkpointKey: checkpointKey)
    }

    public func run() async throws {
        let server: NIOAsyncChannel<NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>, Never>
        do {
            server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .bind(host: address.host, port: address.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                        return try NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>(wrappingChannelSynchronously: channel)
                    }
                }
        } catch {
            throw ServerError(message: "--ui \(address): cannot listen (\(error)); stop what listens there or choose another port")
        }
        let port = server.channel.localAddress?.port ?? address.port
        let url = "http://\(address.host.contains(":") ? "[\(address.host)]" : address.host):\(port)/ui"
        ui.logger.info("ledger page ready", metadata: ["url": "\(url)"])
        do {
            try await cancelWhenGracefulShutdown {
                try await server.executeThenClose { connections in
                    try await withThrowingDiscardingTaskGroup { group in
                        for try await connection in connections {
                            group.addTask { await self.serve(connection) }
                        }
                    }
                }
            }
        } catch is CancellationError {
            // graceful shutdown
        }
        ui.logger.info("ledger page stopped")
    }

    /// Answers the requests of one connection in order (keep-alive), until the client closes it.
    func serve(_ connection: NIOAsyncChannel<HTTPServerRequestPart, HTTPServerResponsePart>) async {
        do {
            try await connection.executeThenClose { inbound, outbound in
                var head: HTTPRequestHead?
                for try await part in inbound {
                    switch part {
                    case .head(let request):
                        head = request
                    case .body:
                        continue  // GET and HEAD carry no body worth reading
                    case .end:
                        guard let request = head else { continue }
                        head = nil
                        let response = await ui.respond(method: request.method.rawValue, uri: request.uri, host: request.headers.first(name: "host"))
                        ui.logger.debug("ledger page request", metadata: ["method": "\(request.method)", "uri": "\(request.uri)", "status": "\(response.status)"])
                        var headers = HTTPHeaders()
                        headers.add(name: "Content-Type", value: response.contentType)
                        headers.add(name: "Content-Length", value: String(response.body.count))
                        headers.add(name: "Cache-Control", value: "no-store")
                        headers.add(name: "X-Content-Type-Options", value: "nosniff")
                        headers.add(name: "X-Frame-Options", value: "DENY")
                        headers.add(name: "Referrer-Policy", value: "no-referrer")
                        headers.add(name: "Content-Security-Policy", value: "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
                        if let allow = response.allow { headers.add(name: "Allow", value: allow) }
                        if !request.isKeepAlive { headers.add(name: "Connection", value: "close") }
                        try await outbound.write(.head(HTTPResponseHead(version: request.version, status: HTTPResponseStatus(statusCode: response.status), headers: headers)))
                        if request.method != .HEAD {
                            try await outbound.write(.body(.byteBuffer(ByteBuffer(bytes: response.body))))
                        }
                        try await outbound.write(.end(nil))
                        if !request.isKeepAlive { return }
                    }
                }
            }
        } catch {
            ui.logger.debug("ledger page connection ended", metadata: ["error": "\(error)"])
        }
    }

    /// The service list entry for `config.ledgerUI`, or nothing when the page is off.
    static func services(_ address: LedgerUIAddress?, core: ServerCore, checkpointKey: LedgerCheckpointKey?) -> [ServiceGroupConfiguration.ServiceConfiguration] {
        guard let address else { return [] }
        return [.init(service: LedgerUIServer(address: address, store: core.store, clock: core.clock, logger: core.logger, checkpointKey: checkpointKey))]
    }
}
