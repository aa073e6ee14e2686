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
        do {
            if rows.isEmpty {
                response.nextSeq = try await ledger.ledgerNextSeq(writer: request.writer)
                return response
            }
            let result = try await ledger.ingestLedger(writer: request.writer, uploader: uploader, rows: rows, at: core.clock.now)
            response.nextSeq = result.nextSeq
            response.accepted = UInt32(result.accepted)
            response.duplicates = UInt32(result.duplicates)
        } catch {
            if error.code == .conflict {
                core.logger.error("ledger upload refused", metadata: ["writer": "\(request.writer)", "uploader": "\(uploader)", "error": "\(error.message)"])
                throw RPCError(code: .failedPrecondition, message: error.message)
            }
            throw RPCError(code: .unavailable, message: "datastore: \(error.message)")
        }
        return response
    }

    /// The caller's SPIFFE ID: a live certificate this server issued, in its trust domain.
    func authenticate(_ context: ServerContext) async throws -> String {
        guard let posix = context.transportSpecific as? HTTP2ServerTransport.Posix.Context, let leaf = posix.peerCertificate,
              let id = leaf.spiffeID, id.trustDomain == core.trustDomain else {
            throw RPCError(code: .unauthenticated, message: "shipping ledger rows needs an SVID of trust domain \(core.trustDomain) as the TLS client certificate")
        }
        let live: Bool
        do {
            live = try await core.store.isLiveCertificate(serial: leaf.serialHex, spiffeID: id.description, issuedSince: .distantPast, now: core.clock.now)
        } catch {
            throw RPCError(code: .unavailable, message: "datastore: \(error.message)")
        }
        guard live else {
            throw RPCError(code: .permissionDenied, message: "the certificate presented by \(id) was not issued by this server or has expired")
        }
        return id.description
    }
}
