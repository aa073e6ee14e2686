// sigil-bench: measurements that are not tests. Run through bench/sign.sh (release build).
//
//   sigil-bench sign [--count N] [--batch B] [--seconds S]
//   sigil-bench ledger-row [--count N]      (LedgerRow.swift: one ledger row's cost, step by step)
//
// Prints, on one core: the limit (one ECDSA P-256 verify + one sign with swift-crypto, per second)
// and the end-to-end CA rate from CSRs (parse + verify CSR + build and sign the SVID + store the
// row in SQLite, committed per batch), and their ratio.
import Foundation
import Crypto
import X509
import SwiftASN1
import SigilCore
import SigilCA
import SigilStore

/// A positive whole-number option; a value that is missing, not a number or not positive ends the
/// run with a message (figures from a silently substituted default would mislead).
func argument(_ name: String, _ fallback: Int) -> Int {
    let args = CommandLine.arguments
    guard let i = args.firstIndex(of: name) else { return fallback }
    guard i + 1 < args.count, let value = Int(args[i + 1]), value > 0 else {
        FileHandle.standardError.write(Data("sigil-bench: \(name) needs a positive whole number (got '\(i + 1 < args.count ? args[i + 1] : "")')\n".utf8))
        exit(2)
    }
    return value
}

func seconds(_ body: () throws -> Void) rethrows -> Double {
    let start = ContinuousClock.now
    try body()
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

func signLimit(seconds budget: Double) -> Double {
    let key = P256.Signing.PrivateKey()
    let message = Array(repeating: UInt8(7), count: 300)
    var n = 0
    let start = ContinuousClock.now
    var elapsed = 0.0
    while elapsed < budget {
        for _ in 0..<200 {
            let sig = try! key.signature(for: message)
            precondition(key.publicKey.isValidSignature(sig, for: message))
            n += 1
        }
        let d = ContinuousClock.now - start
        elapsed = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
    }
    return Double(n) / elapsed
}

func makeCSRs(_ count: Int) throws -> [[UInt8]] {
    try (0..<count).map { i in
        let key = Certificate.PrivateKey(P256.Signing.PrivateKey())
        let csr = try CertificateSigningRequest(version: .v1, subject: DistinguishedName { CommonName("w\(i)") }, privateKey: key,
                                                attributes: .init(), signatureAlgorithm: .ecdsaWithSHA256)
        var s = DER.Serializer()
        try s.serialize(csr)
        return s.serializedBytes
    }
}

func runSign() async throws {
    let count = argument("--count", 4000)
    let batch = argument("--batch", 64)
    let budget = Double(argument("--seconds", 3))
    let dir = NSTemporaryDirectory() + "sigil-bench-\(getpid())"
    defer { try? FileManager.default.removeItem(atPath: dir) }
    let td = try TrustDomain("bench.sigil")
    _ = try await CertificateAuthority.initialize(DataDirectory(dir), options: CAInitOptions(trustDomain: td))
    let ca = try await CertificateAuthority.open(DataDirectory(dir))
    let csrs = try makeCSRs(count)
    let profile = try SVIDProfile(spiffeID: SpiffeID("spiffe://bench.sigil/ns/bench/sa/client"))

    // The limit is measured before and after the run and averaged, so drift in the machine's speed
    // during the run (other tenants, frequency) does not tilt the ratio.
    let limitBefore = signLimit(seconds: budget)

    // Several agents' batches in flight at once, as on a server: while one batch's transaction is
    // being made durable (fsync), the CA signs the next. Everything still runs on one core.
    let concurrency = argument("--concurrency", 4)
    let batches = stride(from: 0, to: csrs.count, by: batch).map { Array(csrs[$0..<min($0 + batch, csrs.count)]) }
    var issued = 0
    var latencies: [Double] = []
    let total = try await timeAsync {
        try await withThrowingTaskGroup(of: (Int, [Double]).self) { group in
            for worker in 0..<concurrency {
                group.addTask {
                    var ok = 0
                    var times: [Double] = []
                    for index in stride(from: worker, to: batches.count, by: concurrency) {
                        let t0 = ContinuousClock.now
                        var requests: [(SigningRequest, SVIDProfile)] = []
                        requests.reserveCapacity(batches[index].count)
                        for bytes in batches[index] { requests.append((try SigningRequest(bytes: bytes), profile)) }
                        let results = await ca.signBatch(requests, requester: "bench")
                        for r in results { if case .success = r { ok += 1 } }
                        let d = ContinuousClock.now - t0
                        times.append(Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18)
                    }
                    return (ok, times)
                }
            }
            for try await (ok, times) in group {
                issued += ok
                latencies += times
            }
        }
    }
    precondition(issued == count, "only \(issued) of \(count) issued")
    let limit = (limitBefore + signLimit(seconds: budget)) / 2
    let rate = Double(issued) / total
    latencies.sort()
    let p99 = latencies[min(latencies.count - 1, Int(Double(latencies.count) * 0.99))]
    print("limit_verify_plus_sign_per_s \(Int(limit))")
    print("ca_end_to_end_per_s \(Int(rate))")
    print("ratio \(String(format: "%.2f", rate / limit))")
    print("batch \(batch)")
    print("concurrency \(concurrency)")
    print("svids \(issued)")
    print("batch_p99_ms \(String(format: "%.2f", p99 * 1000))")
}

func timeAsync(_ body: () async throws -> Void) async rethrows -> Double {
    let start = ContinuousClock.now
    try await body()
    let d = ContinuousClock.now - start
    return Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

/// Where the time goes per SVID: CSR parse + verify, certificate build + sign, store row.
func runPhases() async throws {
    let count = argument("--count", 4000)
    let csrs = try makeCSRs(count)
    let pki = (try TrustDomain("bench.sigil"), Certificate.PrivateKey(P256.Signing.PrivateKey()))
    let rootCert = try CAProfile(trustDomain: pki.0, ttl: .seconds(86_400), commonName: "r", maxPathLength: 1).makeRoot(key: pki.1, now: Date())
    let issuer = try SigningAuthority(certificate: rootCert, privateKey: pki.1)
    let profile = try SVIDProfile(spiffeID: SpiffeID("spiffe://bench.sigil/ns/bench/sa/client"))
    var requests: [SigningRequest] = []
    let parse = try seconds { for c in csrs { requests.append(try SigningRequest(bytes: c)) } }
    var leaves: [Certificate] = []
    let now = Date()
    let sign = try seconds { for r in requests { leaves.append(try profile.makeCertificate(publicKey: r.publicKey, issuer: issuer, now: now)) } }
    let encode = try seconds { for r in requests { _ = try profile.encodeLeaf(publicKey: r.publicKey, issuer: issuer, now: now) } }
    print("encode_leaf_us \(String(format: "%.1f", encode / Double(count) * 1e6))")
    var serials: [String] = []
    let serial = seconds { for l in leaves { serials.append(l.serialHex) } }
    let us = { (t: Double) in String(format: "%.1f", t / Double(count) * 1e6) }
    let pk = seconds { for _ in 0..<count { _ = issuer.privateKey.publicKey } }
    let alg = seconds { for _ in 0..<count { _ = try? issuer.privateKey.sigilSignatureAlgorithm } }
    let td = seconds { for _ in 0..<count { _ = issuer.trustDomain } }
    let key = requests[0].publicKey
    let ext = try seconds { for _ in 0..<count { _ = try Certificate.Extensions {
                Critical(BasicConstraints.notCertificateAuthority)
                Critical(KeyUsage(digitalSignature: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                SubjectKeyIdentifier(hash: key)
                SubjectAlternativeNames([.uniformResourceIdentifier("spiffe://bench.sigil/ns/bench/sa/client")])
            } } }
    let rawSign = try seconds { for _ in 0..<count { _ = try issuer.privateKey.sign(bytes: Array(repeating: UInt8(1), count: 400), signatureAlgorithm: .ecdsaWithSHA256) } }
    let dn = try seconds { for _ in 0..<count { _ = try DistinguishedName { OrganizationName("Sigil") } } }
    let exts = try Certificate.Extensions { Critical(BasicConstraints.notCertificateAuthority) }
    let subj = try DistinguishedName { OrganizationName("Sigil") }
    let certInit = try seconds { for _ in 0..<count { _ = try Certificate(version: .v3, serialNumber: .random128(), publicKey: key, notValidBefore: now, notValidAfter: now + 3600, issuer: subj, subject: subj, signatureAlgorithm: .ecdsaWithSHA256, extensions: exts, issuerPrivateKey: issuer.privateKey) } }
    let canSign = seconds { for _ in 0..<count { _ = try? issuer.certificate.extensions.keyUsage; _ = try? issuer.certificate.extensions.basicConstraints; _ = try? issuer.certificate.extensions.subjectKeyIdentifier } }
    let kp = seconds { for _ in 0..<count { _ = try? KeyPolicy.default.check(key) } }
    let dir = NSTemporaryDirectory() + "sigil-phases-\(getpid())"
    defer { try? FileManager.default.removeItem(atPath: dir) }
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let store = try SQLiteDatastore(path: dir + "/s.db")
    let auth = AuthorityRecord(id: "a", kind: .intermediate, state: .active, parentID: nil, notBefore: now, notAfter: now + 86400, fingerprint: "f", certificatePEM: "", inBundle: false, createdAt: now)
    try await store.initialize(trustDomain: "bench.sigil", authorities: [auth], at: now)
    let rows = serials.map { IssuedCertificate(serial: $0, spiffeID: "spiffe://bench.sigil/ns/bench/sa/client", authorityID: "a", notBefore: now, notAfter: now + 3600, issuedAt: now, requester: "bench") }
    let storeTime = try await timeAsync { var i = 0; while i < rows.count { try await store.recordIssued(Array(rows[i..<min(i + 64, rows.count)])); i += 64 } }
    print("store_row_batch64_us \(us(storeTime))")
    print("dn_us \(us(dn))")
    print("cert_init_us \(us(certInit))")
    print("issuer_ext_parse_us \(us(canSign))")
    print("key_policy_us \(us(kp))")
    print("private_key_public_key_us \(us(pk))")
    print("signature_algorithm_us \(us(alg))")
    print("issuer_trust_domain_us \(us(td))")
    print("extensions_us \(us(ext))")
    print("raw_sign_us \(us(rawSign))")
    print("csr_parse_verify_us \(us(parse))")
    print("make_certificate_us \(us(sign))")
    print("serial_hex_us \(us(serial))")
}

let mode = CommandLine.arguments.dropFirst().first ?? "sign"
switch mode {
case "sign":
    try await runSign()
case "phases":
    try await runPhases()
case "fanout":
    try await runFanout()
case "agent-sign":
    try await runAgentSign()
case "ledger-row":
    try runLedgerRow()
default:
    FileHandle.standardError.write(Data("usage: sigil-bench sign|phases|fanout|agent-sign|ledger-row [--count N] [--batch B] [--seconds S]\n".utf8))
    exit(2)
}
