// Workload API and agent API measurements against a running agent and server (see bench/rotation.sh).
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2
import SigilRPC
import SigilCore
import SigilTLS
import X509
import SwiftASN1
import Crypto
import Synchronization

func option(_ name: String) -> String? {
    let args = CommandLine.arguments
    if let i = args.firstIndex(of: name), i + 1 < args.count { return args[i + 1] }
    return nil
}

/// The leaf's serial, read straight from the DER (Certificate → tbsCertificate → optional [0]
/// version → serialNumber): the bench client stays light, or its own certificate parsing is what the
/// fan-out measures.
func leafSerial(_ chain: Data) -> String {
    let bytes = [UInt8](chain)
    var i = 0
    /// Reads a tag and a definite length at `i`; leaves `i` at the contents.
    func header() -> (tag: UInt8, length: Int)? {
        guard i + 2 <= bytes.count else { return nil }
        let tag = bytes[i]
        var length = Int(bytes[i + 1])
        i += 2
        if length & 0x80 != 0 {
            let n = length & 0x7f
            guard n >= 1, n <= 4, i + n <= bytes.count else { return nil }
            length = bytes[i..<(i + n)].reduce(0) { $0 << 8 | Int($1) }
            i += n
        }
        return (tag, length)
    }
    guard let cert = header(), cert.tag == 0x30, let tbs = header(), tbs.tag == 0x30, var field = header() else { return "?" }
    if field.tag == 0xA0 {
        i += field.length
        guard let next = header() else { return "?" }
        field = next
    }
    guard field.tag == 0x02, i + field.length <= bytes.count else { return "?" }
    let digits = Array("0123456789abcdef".utf8)
    var hex: [UInt8] = []
    for byte in bytes[i..<(i + field.length)] { hex.append(digits[Int(byte >> 4)]); hex.append(digits[Int(byte & 15)]) }
    return String(decoding: hex, as: UTF8.self)
}

/// Opens `streams` FetchX509SVID streams (over `connections` connections), waits for the SVID to
/// rotate, and reports when each stream saw the new serial.
func runFanout() async throws {
    let socket = option("--socket") ?? "/tmp/sigil/agent.sock"
    let streams = Int(option("--streams") ?? "1000") ?? 1000
    let connections = Int(option("--connections") ?? "50") ?? 50
    let timeout = Double(option("--timeout") ?? "120") ?? 120
    // `--watch svid` (default): a change of the leaf's serial; `--watch bundle`: of the trust bundle.
    let watchBundle = option("--watch") == "bundle"
    let arrivals = Shared<[String: [Double]]>([:])   // new serial -> arrival times
    let initial = Shared<[String: Int]>([:])
    let ready = Shared(0)
    let start = Date()
    try await withThrowingTaskGroup(of: Void.self) { group in
        for c in 0..<connections {
            group.addTask {
                let transport = try HTTP2ClientTransport.Posix(target: .unixDomainSocket(path: socket), transportSecurity: .plaintext)
                try await withGRPCClient(transport: transport) { grpc in
                    let api = SPIFFESpiffeWorkloadAPI.Client(wrapping: grpc)
                    try await withThrowingTaskGroup(of: Void.self) { inner in
                        for _ in stride(from: c, to: streams, by: connections) {
                            inner.addTask {
                                try await api.fetchX509SVID(SPIFFEX509SVIDRequest(), metadata: ["workload.spiffe.io": "true"]) { response in
                                    var first: String?
                                    var rotated = false
                                    // The stream stays open after the rotation (as a workload's does):
                                    // closing 1,000 streams inside the fan-out would be measured with it.
                                    for try await message in response.messages where !rotated {
                                        let serial = watchBundle ? "bundle-\(message.svids[0].bundle.count)-\(message.svids[0].bundle.hashValue)"
                                                                 : leafSerial(message.svids[0].x509Svid)
                                        if first == nil {
                                            first = serial
                                            initial.withLock { $0[serial, default: 0] += 1 }
                                            ready.withLock { $0 += 1 }
                                        } else if serial != first {
                                            let t = Date().timeIntervalSince(start)
                                            arrivals.withLock { $0[serial, default: []].append(t) }
                                            rotated = true
                                        }
                                    }
                                }
                            }
                        }
                        try await inner.waitForAll()
                    }
                }
            }
        }
        // Tell the driver (bench/rotation.sh) when every stream holds its first answer.
        while ready.withLock({ $0 }) < streams, Date().timeIntervalSince(start) < timeout {
            try await Task.sleep(for: .milliseconds(20))
        }
        FileHandle.standardError.write(Data("fanout_ready \(Date().timeIntervalSince1970)\n".utf8))
        // Done when every stream saw a rotation, or at the timeout.
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            try await Task.sleep(for: .milliseconds(50))
            let got = arrivals.withLock { $0.values.reduce(0) { $0 + $1.count } }
            if got >= streams { break }
        }
        group.cancelAll()
    }
    let all = arrivals.withLock { $0 }
    let times = all.values.flatMap { $0 }.sorted()
    guard let first = times.first, let last = times.last else {
        print("fanout_streams_rotated 0")
        return
    }
    func pct(_ p: Double) -> Double { times[min(times.count - 1, Int(Double(times.count) * p))] - first }
    print("fanout_streams \(streams)")
    print("fanout_streams_ready \(ready.withLock { $0 })")
    print("fanout_streams_rotated \(times.count)")
    print("fanout_spread_ms \(String(format: "%.1f", (last - first) * 1000))")
    print("fanout_last_unix \(String(format: "%.4f", start.timeIntervalSince1970 + last))")
    print("fanout_p50_ms \(String(format: "%.1f", pct(0.5) * 1000))")
    print("fanout_p99_ms \(String(format: "%.1f", pct(0.99) * 1000))")
}

/// Signs CSRs through the agent API with an agent's own SVID, in batches, and reports the rate.
func runAgentSign() async throws {
    guard let agentDir = option("--agent-dir"), let server = option("--server"), let entriesFile = option("--entries") else {
        print("usage: sigil-bench agent-sign --agent-dir DIR --server HOST:PORT --entries FILE [--rounds N] [--batch B] [--concurrency C]")
        exit(2)
    }
    let rounds = Int(option("--rounds") ?? "5") ?? 5
    let batch = Int(option("--batch") ?? "100") ?? 100
    struct Identity: Decodable { let chainDER: [[UInt8]]; let keyPKCS8DER: [UInt8]; let trustDomain: String }
    let identity = try JSONDecoder().decode(Identity.self, from: Data(contentsOf: URL(fileURLWithPath: agentDir + "/agent.json")))
    let entryIDs = try String(contentsOfFile: entriesFile, encoding: .utf8).split(separator: "\n").map(String.init)
    let bundlePEM = try String(contentsOfFile: option("--bundle") ?? "pki/bundle.pem", encoding: .utf8)
    let td = try TrustDomain(identity.trustDomain)
    let bundle = try TrustBundle(pem: bundlePEM, trustDomain: td)
    let reloader = try SVIDCertificateReloader(chainDER: identity.chainDER, keyPKCS8DER: identity.keyPKCS8DER)
    let host = String(server.split(separator: ":")[0])
    let port = Int(server.split(separator: ":")[1]) ?? 8081
    let transport = try HTTP2ClientTransport.Posix(
        target: .ipv4(address: host, port: port),
        transportSecurity: .mTLS(certificateReloader: reloader) { tls in
            tls.serverCertificateVerification = .noHostnameVerification
            tls.trustRoots = .certificates([])
            tls.customVerificationCallback = SpiffeTLS.verificationCallback(bundle: { bundle })
        })
    // CSRs made beforehand: the agent's key generation is not the server's cost.
    var made: [Data] = []
    for _ in 0..<batch {
        let key = P256.Signing.PrivateKey()
        let csr = try CertificateSigningRequest(version: .v1, subject: DistinguishedName { CommonName("w") }, privateKey: Certificate.PrivateKey(key),
                                                attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        var s = DER.Serializer()
        try s.serialize(csr)
        made.append(Data(s.serializedBytes))
    }
    let csrs = made
    // `--concurrency N` batches in flight at once, as N agents' batches would be; every batch's
    // round trip is one SVID's issuance latency (a workload gets its SVID when its batch returns).
    let concurrency = Int(option("--concurrency") ?? "1") ?? 1
    let batches = Array(stride(from: 0, to: entryIDs.count, by: batch))
    let (signed, seconds, latencies) = try await withGRPCClient(transport: transport) { grpc -> (Int, Double, [Double]) in
        let api = SigilAgentAPI.Client(wrapping: grpc)
        let t0 = ContinuousClock.now
        return try await withThrowingTaskGroup(of: (Int, [Double]).self) { group in
            for lane in 0..<concurrency {
                group.addTask {
                    var ok = 0
                    var times: [Double] = []
                    for _ in 0..<rounds {
                        for (n, start) in batches.enumerated() where n % concurrency == lane {
                            var request = SigilSignX509SVIDsRequest()
                            for (i, id) in entryIDs[start..<min(start + batch, entryIDs.count)].enumerated() {
                                var item = SigilSVIDRequest()
                                item.entryID = id
                                item.csr = csrs[i % csrs.count]
                                request.requests.append(item)
                            }
                            let b0 = ContinuousClock.now
                            let response = try await api.signX509SVIDs(request)
                            let d = ContinuousClock.now - b0
                            times.append(Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18)
                            ok += response.results.filter { $0.error.isEmpty }.count
                        }
                    }
                    return (ok, times)
                }
            }
            var ok = 0
            var all: [Double] = []
            for try await (n, times) in group {
                ok += n
                all += times
            }
            let d = ContinuousClock.now - t0
            return (ok, Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18, all.sorted())
        }
    }
    func pct(_ q: Double) -> Double { latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, Int(Double(latencies.count) * q))] }
    print("agent_api_svids \(signed)")
    print("agent_api_svids_per_s \(Int(Double(signed) / seconds))")
    print("agent_api_concurrency \(concurrency)")
    print("agent_api_issuance_p50_ms \(String(format: "%.1f", pct(0.50) * 1000))")
    print("agent_api_issuance_p99_ms \(String(format: "%.1f", pct(0.99) * 1000))")
    print("agent_api_batch \(batch)")
}

final class Shared<Value: Sendable>: Sendable {
    private let mutex: Mutex<Value>
    init(_ value: Value) { mutex = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { mutex.withLock { body(&$0) } }
}
