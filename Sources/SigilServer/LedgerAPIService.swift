public import GRPCCore
public import SigilRPC
import GRPCNIOTransportHTTP2
import SigilCore
public import SigilStore
import X509
import Logging
import Foundation

/// The ledger API: proxies ship their who-called-whom rows here. The caller must present a live
/// SVID of this trust domain issued by this server; the first caller to ship a writer owns it.
/// Every row is checked against its own hash before anything is stored, and (writer, seq) is
/// stored once, so retries never duplicate.
public struct LedgerAPIService: SigilLedgerAPI.SimpleServiceProtocol {
    let core: ServerCore
    let ledger: any LedgerStore
    static let maxRows = 10_000

    public init(core: ServerCore, ledger: any LedgerStore) {
        self.core = core
        self.ledger = ledger
    }

    public func append(request: SigilLedgerAppendRequest, context: ServerContext) async throws -> SigilLedgerAppendResponse {
        let uploader = try await authenticate(context)
        guard !request.writer.isEmpty else { throw RPCError(code: .invalidArgument, message: "the append names no writer") }
        // Shippers are proxies: their writers are `proxy:...`; every other name (the server's own
        // chain above all, in any spelling) is not theirs to append to.
        guard request.writer.hasPrefix("proxy:") else {
            throw RPCError(code: .invalidArgument, message: "writer '\(request.writer.prefix(200))' is not a proxy's (proxy:...); only proxies ship rows")
        }
        guard request.rows.count <= Self.maxRows else {
            throw RPCError(code: .invalidArgument, message: "at most \(Self.maxRows) rows per append (got \(request.rows.count))")
        }
        var rows: [LedgerRow] = []
        rows.reserveCapacity(request.rows.count)
        for (index, bytes) in request.rows.enumerated() {
            do {
                rows.append(try LedgerRow.parse(line: bytes))
            } catch {
                throw RPCError(code: .invalidArgument, message: "row \(index) of writer '\(request.writer)' is refused: \(error.description)")
            }
        }
        var response = SigilLedgerAppendResponse()
        try check(rows, uploader: uploader)
        if rows.isEmpty {
            // Where a chain stands is told only to the writer's owner.
            let owner: String?
            do { owner = try await ledger.ledgerWriterUploader(writer: request.writer) } catch {
                throw core.storeFailed(error, during: "ledger append")
            }
            if let owner, owner != uploader {
                throw RPCError(code: .failedPrecondition, message: "ledger writer '\(request.writer)' is shipped by another workload")
            }
        }
        do {
            if rows.isEmpty {
                response.nextSeq = try await ledger.ledgerNextSeq(writer: request.writer)
                return response
            }
            let result = try await ledger.ingestLedger(writer: request.writer, uploader: uploader, rows: rows, at: core.clock.now)
            response.nextSeq = result.nextSeq
            response.accepted = UInt32(result.accepted)
            response.duplicates = UInt32(result.duplicates)
            core.storeHealth.wrote("ledger append")
        } catch {
            if error.code == .conflict {
                core.logger.error("ledger upload refused", metadata: ["writer": "\(request.writer)", "uploader": "\(uploader)", "error": "\(error.message)"])
                throw RPCError(code: .failedPrecondition, message: error.message)
            }
            throw core.storeFailed(error, during: "ledger append")
        }
        return response
    }

    /// The kinds of row a proxy writes.
    static let proxyKinds: Set<String> = ["request", "connection", "policy_reload", "policy_rejected", "kill_switch_on",
                                          "kill_switch_off", "identity", "spool_rotated"]

    /// What a proxy may claim: its own kinds of row, no time more than a day ahead of the
    /// server's clock (a refused row stops its writer's shipping, so only the absurd is refused), and on a call's row its own identity on one side (the callee on inbound,
    /// the caller on outbound): a workload cannot enter calls between two others.
    func check(_ rows: [LedgerRow], uploader: String) throws {
        let horizon = Int64(core.clock.now.timeIntervalSince1970 * 1_000_000) + 86_400_000_000
        for row in rows {
            guard Self.proxyKinds.contains(row.kind) else {
                throw RPCError(code: .invalidArgument, message: "row seq \(row.seq): a proxy does not write '\(row.kind.prefix(40))' rows")
            }
            guard row.timeMicros <= horizon else {
                throw RPCError(code: .invalidArgument, message: "row seq \(row.seq) is stamped \(RFC3339.format(micros: row.timeMicros)), more than a day ahead of the server's clock")
            }
            if row.kind == "request" || row.kind == "connection" {
                try checkCall(row, uploader: uploader)
            }
        }
    }

    /// A call's row as only the uploader's own proxy writes it: the callee's record (requests, and
    /// inbound connections) names the uploader as destination; the caller's record (an outbound
    /// connection, marked `outbound` in its detail) names it as source. A source is a SPIFFE ID of
    /// this trust domain over mTLS, or none for a plaintext caller; a decision is allow or deny.
    /// So a workload cannot enter calls between others, calls made to others as their record, or
    /// a plaintext or made-up caller the audit graph would count.
    func checkCall(_ row: LedgerRow, uploader: String) throws {
        func refuse(_ why: String) -> RPCError {
            RPCError(code: .permissionDenied, message: "row seq \(row.seq) (\(row.kind)): \(why); \(uploader) may ship only its own record of calls it took part in")
        }
        let outbound = row.kind == "connection" && row.source == uploader && (row.detail ?? "").hasPrefix("outbound")
        guard row.destination == uploader || outbound else {
            throw refuse("a call between \(row.source ?? "a plaintext caller") and \(row.destination ?? "-")")
        }
        guard row.decision == "allow" || row.decision == "deny" else {
            throw refuse("the decision '\((row.decision ?? "none").prefix(40))' is neither allow nor deny")
        }
        if !outbound {
            if let source = row.source {
                guard let id = try? SpiffeID(source), id.trustDomain == core.trustDomain, row.mtls else {
                    throw refuse("the caller '\(source.prefix(80))' is not an mTLS-verified SPIFFE ID of \(core.trustDomain)")
                }
            } else if row.mtls {
                throw refuse("an mTLS call without the caller's SPIFFE ID")
            }
        }
    }

    /// The caller's SPIFFE ID: a live certificate this server issued, in its trust domain.
    func authenticate(_ context: ServerContext) async throws -> String {
        guard let posix = context.transportSpecific as? HTTP2ServerTransport.Posix.Context, let leaf = posix.peerCertificate,
              let id = leaf.spiffeID, id.trustDomain == core.trustDomain else {
            throw RPCError(code: .unauthenticated, message: "shipping ledger rows needs an SVID of trust domain \(core.trustDomain) as the TLS client certificate")
        }
        let live: Bool
        do {
            live = try await core.store.isLiveCertificate(serial: leaf.serialHex, sha256: leaf.sha256Fingerprint, spiffeID: id.description, issuedSince: .distantPast, now: core.clock.now)
        } catch {
            throw core.storeFailed(error, during: "ledger authentication")
        }
        guard live else {
            throw RPCError(code: .permissionDenied, message: "the certificate presented by \(id) was not issued by this server or has expired")
        }
        return id.description
    }
}
