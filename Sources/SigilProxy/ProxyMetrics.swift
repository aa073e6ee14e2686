import CoreMetrics
public import Prometheus

/// The proxy's metrics, made once (every counter and gauge exists before the first request, so the
/// request path only does atomic adds and stores: no label dictionaries, no lookups). They are
/// swift-metrics objects backed by a Prometheus registry of this proxy's own, which `--metrics`
/// serves as text at `GET /metrics`. Names follow `sigil_proxy_<what>_<unit>`.
public final class ProxyMetrics: Sendable {
    public let registry: PrometheusCollectorRegistry
    let requestsAllowed: CoreMetrics.Counter
    let requestsDenied: CoreMetrics.Counter
    let refusedRequests: CoreMetrics.Counter
    let ledgerRows: CoreMetrics.Counter
    let ledgerDroppedRows: CoreMetrics.Counter
    let spoolBytes: CoreMetrics.Gauge
    let spoolFull: CoreMetrics.Gauge
    let spoolHeldRows: CoreMetrics.Gauge

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
        let factory = PrometheusMetricsFactory(registry: registry)
        requestsAllowed = CoreMetrics.Counter(label: "sigil_proxy_requests_total", dimensions: [("decision", "allow")], factory: factory)
        requestsDenied = CoreMetrics.Counter(label: "sigil_proxy_requests_total", dimensions: [("decision", "deny")], factory: factory)
        refusedRequests = CoreMetrics.Counter(label: "sigil_proxy_ledger_refused_requests_total", factory: factory)
        ledgerRows = CoreMetrics.Counter(label: "sigil_proxy_ledger_rows_total", factory: factory)
        ledgerDroppedRows = CoreMetrics.Counter(label: "sigil_proxy_ledger_dropped_rows_total", factory: factory)
        spoolBytes = CoreMetrics.Gauge(label: "sigil_proxy_ledger_spool_bytes", factory: factory)
        spoolFull = CoreMetrics.Gauge(label: "sigil_proxy_ledger_spool_full", factory: factory)
        spoolHeldRows = CoreMetrics.Gauge(label: "sigil_proxy_ledger_spool_held_rows", factory: factory)
        spoolFull.record(0)
        spoolBytes.record(0)
        spoolHeldRows.record(0)
    }

    /// One authorized request (or TCP connection).
    @inline(__always)
    func request(allowed: Bool) {
        (allowed ? requestsAllowed : requestsDenied).increment()
    }

    func rowsWritten(_ count: Int = 1) { ledgerRows.increment(by: count) }
    func rowDropped(_ count: Int = 1) { ledgerDroppedRows.increment(by: count) }
    func requestRefused() { refusedRequests.increment() }
    func spool(bytes: Int) { spoolBytes.record(bytes) }
    func spool(full: Bool) { spoolFull.record(full ? 1 : 0) }
    func spool(held: Int) { spoolHeldRows.record(held) }

    /// The Prometheus text exposition of every metric.
    public func text() -> String {
        registry.emitToString()
    }
}
