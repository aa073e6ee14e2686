import ArgumentParser
import SigilCore
import SigilCA
import SigilStore
import Foundation
import SigilRPC
import X509
import SwiftASN1

struct CACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ca",
        abstract: "Create and inspect the certificate authority; sign SVIDs by hand.",
        subcommands: [CAInit.self, CASign.self, CAStatus.self, CARotate.self, CARetire.self, CATaint.self, CARevoke.self]
    )
}

struct CAInit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init",
        abstract: "Create the trust root and a signing intermediate (or chain to an upstream CA).",
        discussion: """
            Self-signed (default): makes an ECDSA P-256 root and an intermediate signing CA. Keys are
            written as PKCS#8 PEM, mode 0600, in <data-dir>/keys (mode 0700); the trust bundle is
            written to <data-dir>/bundle.pem.

            Upstream: with --upstream-cert and --upstream-key, Sigil makes only an intermediate signed
            by your existing (corporate) CA. If the upstream certificate is not itself a root, pass the
            root(s) peers must trust with --upstream-bundle.

            An existing CA is never overwritten unless --force is given; it is then moved to
            <data-dir>/replaced-<unix-time>/, not deleted.

            Example:
              sigil ca init --trust-domain example.org --data-dir /var/lib/sigil
            """
    )

    @Option(name: .long, help: ArgumentHelp("The trust domain, e.g. example.org or cluster.local.", valueName: "td"))
    var trustDomain: String

    @OptionGroup var data: DataDirOption

    @Option(name: .long, help: ArgumentHelp("PEM certificate of an existing CA to chain to (its intermediates may follow).", valueName: "file"))
    var upstreamCert: String?

    @Option(name: .long, help: ArgumentHelp("PEM private key of --upstream-cert.", valueName: "file"))
    var upstreamKey: String?

    @Option(name: .long, help: ArgumentHelp("PEM root certificate(s) of the upstream CA, when --upstream-cert is not a root.", valueName: "file"))
    var upstreamBundle: String?

    @Option(name: .long, help: ArgumentHelp("Lifetime of a self-signed root.", valueName: "duration"))
    var rootTtl: String = "3650d"

    @Option(name: .long, help: ArgumentHelp("Lifetime of the intermediate signing CA.", valueName: "duration"))
    var caTtl: String = "30d"

    @Flag(name: .long, help: "Replace an existing CA (it is moved aside, not deleted).")
    var force = false

    @Flag(name: .long, help: "Print the result as JSON.")
    var json = false

    func validate() throws {
        if (upstreamCert == nil) != (upstreamKey == nil) {
            throw ValidationError("--upstream-cert and --upstream-key go together: give both or neither")
        }
        if upstreamBundle != nil && upstreamCert == nil {
            throw ValidationError("--upstream-bundle needs --upstream-cert and --upstream-key")
        }
    }

    func run() async throws {
        if let scheme = trustDomain.range(of: "://"), trustDomain[scheme.upperBound...].contains("/") {
            throw CLIError.usage("--trust-domain '\(trustDomain)' has a path; give the trust domain name alone, e.g. example.org")
        }
        let td = try TrustDomain(trustDomain)
        let rootTTL = try parseDuration(rootTtl, flag: "--root-ttl"), caTTL = try parseDuration(caTtl, flag: "--ca-ttl")
        guard caTTL < rootTTL || upstreamCert != nil else {
            throw CLIError.usage("--ca-ttl \(caTtl) must be shorter than --root-ttl \(rootTtl): an intermediate cannot outlive the root that signs it")
        }
        var options = CAInitOptions(
            trustDomain: td,
            rootTTL: rootTTL,
            caTTL: caTTL,
            force: force)
        if let upstreamCert, let upstreamKey {
            options.upstream = try UpstreamCA.load(certificatePath: upstreamCert, keyPath: upstreamKey, bundlePath: upstreamBundle)
        }
        let summary = try await CertificateAuthority.initialize(data.directory, options: options)
        if json {
            struct Out: Encodable {
                let trust_domain: String
                let data_dir: String
                let bundle_path: String
                let replaced_to: String?
                let authorities: [AuthorityRecord]
            }
            printJSON(Out(trust_domain: td.name, data_dir: summary.directory.path, bundle_path: summary.directory.bundlePEMPath,
                          replaced_to: summary.replacedTo, authorities: summary.authorities))
            return
        }
        if let moved = summary.replacedTo { print("previous CA moved to \(moved)") }
        print("initialized CA for trust domain \(td) in \(summary.directory.path)")
        printTable(["ID", "KIND", "STATE", "NOT AFTER", "IN BUNDLE"], summary.authorities.map {
            [$0.id, $0.kind.rawValue, $0.state.rawValue, iso8601($0.notAfter), $0.inBundle ? "yes" : "no"]
        })
        print("trust bundle: \(summary.directory.bundlePEMPath) (\(summary.bundle.authorities.count) root)")
    }
}

struct CASign: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sign",
        abstract: "Sign an X509-SVID for a CSR; prints the chain (leaf first, no root) as PEM.",
        discussion: """
            Only the CSR's public key is used, after its signature is verified. The SPIFFE ID, TTL and
            DNS names come from the flags; anything else the CSR asks for (CA:true, other SANs, a
            subject) is ignored. Every issued certificate is recorded in the CA's store.

            Example:
              openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout w.key -subj /CN=w -out w.csr
              sigil ca sign --data-dir pki --csr w.csr --spiffe-id spiffe://example.org/ns/default/sa/web > w.pem
            """
    )

    @OptionGroup var data: DataDirOption

    @Option(name: .long, help: ArgumentHelp("The CSR, PEM or DER ('-' reads standard input).", valueName: "file"))
    var csr: String

    @Option(name: .long, help: ArgumentHelp("The SPIFFE ID to issue, e.g. spiffe://example.org/ns/default/sa/web.", valueName: "id"))
    var spiffeId: String

    @Option(name: .long, help: ArgumentHelp("Lifetime of the SVID (clamped to the signing CA's).", valueName: "duration"))
    var ttl: String = "1h"

    @Option(name: .long, help: ArgumentHelp("A DNS name to add as a SAN (repeatable).", valueName: "name"))
    var dns: [String] = []

    @Option(name: .long, help: ArgumentHelp("Write the chain to this file instead of standard output.", valueName: "file"))
    var out: String?

    func run() async throws {
        let id = try SpiffeID(spiffeId)
        let profile = try SVIDProfile(spiffeID: id, ttl: try parseDuration(ttl, flag: "--ttl"), dnsNames: dns)
        let request = try SigningRequest(bytes: try readInput(csr, what: "CSR file"))
        let ca = try await CertificateAuthority.open(data.directory)
        let svid = try await ca.sign(request, profile: profile, requester: "cli:uid:\(getuid())")
        if let out {
            try KeyFiles.writeAtomically(Array(svid.chainPEM.utf8), to: out, mode: 0o644)
            FileHandle.standardError.write(Data("issued \(id) serial \(svid.record.serial), valid until \(iso8601(svid.record.notAfter)); chain written to \(out)\n".utf8))
        } else {
            print(svid.chainPEM, terminator: "")
            FileHandle.standardError.write(Data("issued \(id) serial \(svid.record.serial), valid until \(iso8601(svid.record.notAfter))\n".utf8))
        }
    }
}

struct CAStatus: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "List the CA's authorities: kind, state, validity, how many SVIDs each signed and how many are still live."
    )

    @OptionGroup var data: DataDirOption

    @Flag(name: .long, help: "Print the result as JSON.")
    var json = false

    func run() async throws {
        let (bundle, authorities) = try await CertificateAuthority.inspect(data.directory)
        let (unconfirmed, tainted) = try await CertificateAuthority.readiness(data.directory)
        if json {
            struct Row: Encodable {
                let id, kind, state, subject, fingerprint: String
                let parent_id: String?
                let not_before, not_after: Date
                let in_bundle: Bool
                let issued: Int
                let live: Int
                let last_svid_expiry: Date?
                let tainted: Bool
            }
            struct Agent: Encodable { let id: String; let bundle_sequence: UInt64 }
            struct Out: Encodable {
                let trust_domain: String
                let bundle_sequence: UInt64
                /// The readiness gate: live agents that have not confirmed the current bundle.
                let unconfirmed_agents: [Agent]
                let authorities: [Row]
            }
            printJSON(Out(trust_domain: bundle.trustDomain.name, bundle_sequence: bundle.sequenceNumber,
                          unconfirmed_agents: unconfirmed.map { Agent(id: $0.id, bundle_sequence: $0.bundleSequence) }, authorities: authorities.map {
                Row(id: $0.record.id, kind: $0.record.kind.rawValue, state: $0.record.state.rawValue, subject: $0.subject,
                    fingerprint: $0.record.fingerprint, parent_id: $0.record.parentID, not_before: $0.record.notBefore,
                    not_after: $0.record.notAfter, in_bundle: $0.record.inBundle, issued: $0.issuedCount,
                    live: $0.live, last_svid_expiry: $0.lastExpiry, tainted: tainted.contains($0.record.id))
            }))
            return
        }
        print("trust domain \(bundle.trustDomain)   bundle sequence \(bundle.sequenceNumber)   \(bundle.authorities.count) root(s) in bundle")
        printTable(["ID", "KIND", "STATE", "NOT BEFORE", "NOT AFTER", "ISSUED", "LIVE", "IN BUNDLE", "SUBJECT"], authorities.map {
            [$0.record.id, $0.record.kind.rawValue, $0.record.state.rawValue + (tainted.contains($0.record.id) ? " (tainted)" : ""), iso8601($0.record.notBefore),
             iso8601($0.record.notAfter), "\($0.issuedCount)", "\($0.live)", $0.record.inBundle ? "yes" : "no", $0.subject]
        })
        if unconfirmed.isEmpty {
            print("readiness gate: every live agent holds bundle \(bundle.sequenceNumber)")
        } else {
            print("readiness gate: \(unconfirmed.count) agent(s) have not confirmed bundle \(bundle.sequenceNumber):")
            for agent in unconfirmed { print("  \(agent.id) (holds \(agent.bundleSequence == 0 ? "none confirmed" : "\(agent.bundleSequence)"), last seen \(iso8601(agent.lastSeen)))") }
        }
    }
}

struct BundleCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bundle",
        abstract: "Show the trust bundle peers must trust.",
        subcommands: [BundleShow.self]
    )
}

struct BundleShow: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "show",
        abstract: "Print the trust bundle as PEM or as a SPIFFE bundle (JWK Set).",
        discussion: """
            --format pem prints the root certificates; --format spiffe prints the SPIFFE bundle
            document (keys with use x509-svid and one x5c certificate each, spiffe_sequence,
            spiffe_refresh_hint), as served by SPIFFE bundle endpoints.
            """
    )

    enum Format: String, ExpressibleByArgument, CaseIterable {
        case pem, spiffe
    }

    @OptionGroup var data: DataDirOption

    @Option(name: .long, help: ArgumentHelp("Ask a running server instead of reading --data-dir.", valueName: "path"))
    var adminSocket: String?

    @Option(name: .long, help: "Output format.")
    var format: Format = .pem

    func run() async throws {
        let bundle: TrustBundle
        let jwtBundle: JWTBundle
        if let adminSocket {
            let response = try await AdminSocketOption(adminSocket: adminSocket).call { client in
                try await client.getBundle(SigilGetBundleRequest(), options: adminCallOptions)
            }
            do {
                let trustDomain = try TrustDomain(response.trustDomain)
                bundle = try TrustBundle(trustDomain: trustDomain,
                                         authorities: response.roots.map { try Certificate(derEncoded: Array($0)) },
                                         sequenceNumber: response.sequence, refreshHint: .seconds(300))
                jwtBundle = response.jwtBundle.isEmpty ? JWTBundle(trustDomain: trustDomain)
                    : try JWTBundle(jwksJSON: Array(response.jwtBundle), trustDomain: trustDomain)
            } catch {
                throw CLIError.usage("the server sent a bundle that cannot be read: \(error)")
            }
        } else {
            (bundle, _) = try await CertificateAuthority.inspect(data.directory)
            // The JWT keys are read (from their key files) only when the SPIFFE bundle is asked for.
            jwtBundle = format == .spiffe ? try CertificateAuthority.jwtBundle(data.directory, trustDomain: bundle.trustDomain)
                                          : JWTBundle(trustDomain: bundle.trustDomain)
        }
        switch format {
        case .pem: print(bundle.pemEncoded, terminator: "")
        // The SPIFFE bundle holds both kinds of keys (`x509-svid` roots, `jwt-svid` signing keys).
        case .spiffe: print(bundle.spiffeBundleJSON(prettyPrinted: true, jwtBundle: jwtBundle))
        }
    }
}

struct CARotate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rotate",
        abstract: "Rotate the signing intermediate now, or (--root) start a root rotation.",
        discussion: """
            The server does this on its own schedule (prepare at 1/2 of the active intermediate's
            life, activate at 5/6); this command does it now. The previous intermediate becomes
            `old` and stays until the last SVID it signed has expired, so nothing it signed stops
            verifying. A running server on the same --data-dir switches within seconds; agents
            renew onto the new intermediate at their next renewal.

            With --root: a new root and an intermediate under it are prepared and the root is
            published in the trust bundle beside the current one at once. The server makes them
            active only when every live agent has confirmed that bundle (the readiness gate shown
            by `sigil ca status`), so no workload is ever handed an SVID its peers cannot verify.

            Examples:
              sigil ca rotate --data-dir pki && sigil ca status --data-dir pki
              sigil ca rotate --root --data-dir pki
            """
    )

    @OptionGroup var data: DataDirOption
    @Flag(name: .long, help: "Rotate the root: publish a new root beside the current one now, switch when every agent has confirmed it.") var root = false
    @Option(name: .long, help: ArgumentHelp("Upstream-CA mode: move to this upstream CA certificate (chain) the same way.", valueName: "file")) var upstreamCert: String?
    @Option(name: .long, help: ArgumentHelp("The new upstream CA's private key.", valueName: "file")) var upstreamKey: String?
    @Option(name: .long, help: ArgumentHelp("The new upstream CA's root(s), if --upstream-cert is not self-signed.", valueName: "file")) var upstreamBundle: String?
    @Flag(name: .long, help: "Print the result as JSON.") var json = false

    func validate() throws {
        if (upstreamCert == nil) != (upstreamKey == nil) { throw ValidationError("--upstream-cert and --upstream-key go together") }
        if upstreamBundle != nil, upstreamCert == nil { throw ValidationError("--upstream-bundle needs --upstream-cert and --upstream-key") }
        if root, upstreamCert != nil { throw ValidationError("--root rotates Sigil's own root; --upstream-cert moves to a new upstream CA: give one of them") }
    }

    func run() async throws {
        do {
            let ca = try await CertificateAuthority.open(data.directory)
            if let upstreamCert, let upstreamKey {
                let upstream = try UpstreamCA.load(certificatePath: upstreamCert, keyPath: upstreamKey, bundlePath: upstreamBundle)
                let next = try await ca.prepareUpstream(upstream, requester: "cli")
                if json {
                    struct Out: Encodable { let intermediate: String; let not_after: Date }
                    printJSON(Out(intermediate: next.id, not_after: next.notAfter))
                } else {
                    print("""
                        prepared intermediate \(next.id) under the new upstream CA (valid until \(iso8601(next.notAfter))); any new
                        upstream root is in the trust bundle now. The server switches as soon as every live agent has
                        confirmed that bundle (see the readiness gate in `sigil ca status`).
                        """)
                }
                return
            }
            if root {
                let (newRoot, intermediate) = try await ca.prepareRoot(requester: "cli")
                if json {
                    struct Out: Encodable { let root, intermediate: String; let not_after: Date }
                    printJSON(Out(root: newRoot.id, intermediate: intermediate.id, not_after: newRoot.notAfter))
                } else {
                    print("""
                        prepared root \(newRoot.id) (valid until \(iso8601(newRoot.notAfter))) with intermediate \(intermediate.id):
                        the root is in the trust bundle now, beside the current one. The server activates both as
                        soon as every live agent has confirmed the new bundle (see the readiness gate in
                        `sigil ca status`); the old root leaves the bundle once nothing it signed is live.
                        """)
                }
                return
            }
            let previous = await ca.activeAuthorityID
            let next = try await ca.prepareIntermediate(requester: "cli")
            try await ca.activate(next.id, requester: "cli")
            if json {
                struct Out: Encodable { let previous, active: String; let not_after: Date }
                printJSON(Out(previous: previous, active: next.id, not_after: next.notAfter))
            } else {
                print("rotated: intermediate \(next.id) is signing (valid until \(iso8601(next.notAfter))); \(previous) is old until its last SVID expires")
            }
        } catch {
            throw CLIError.usage(error.message)
        }
    }
}

/// `sigil ca retire|taint|revoke ID`: one authority, by the ID `sigil ca status` shows.
struct AuthorityArguments: ParsableArguments {
    @Argument(help: "The authority's ID (from `sigil ca status`).") var id: String
    @OptionGroup var data: DataDirOption

    /// Opens the CA, runs `body` on it and prints `done`; a refusal exits 1, anything else 2.
    func run(_ done: String, _ body: (CertificateAuthority) async throws(CAError) -> Void) async throws {
        do {
            try await body(try await CertificateAuthority.open(data.directory))
            print(done)
        } catch {
            throw error.code == .policy ? CLIError.negative(error.message) : CLIError.usage(error.message)
        }
    }
}

struct CARetire: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "retire",
        abstract: "Remove an old authority now (out of the bundle for a root).",
        discussion: """
            The server removes old authorities on its own once nothing they signed is live. This
            does it now, and refuses while live SVIDs chain to the authority or live agents have
            not confirmed the current bundle (the readiness gate), unless --force.
            """)
    @OptionGroup var authority: AuthorityArguments
    @Flag(name: .long, help: "Retire even with live SVIDs or unconfirmed agents (their peers stop trusting them).") var force = false

    func run() async throws {
        try await authority.run("retired \(authority.id)") { ca throws(CAError) in try await ca.retire(authority.id, force: force, requester: "cli") }
    }
}

struct CATaint: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "taint",
        abstract: "Mark an authority as not to be relied on: agents re-issue every SVID that chains to it, now.",
        discussion: """
            Tainting the signing intermediate first rotates to a new one. The active root cannot be
            tainted: rotate the root first (sigil ca rotate --root), then taint the old one. Follow
            with `sigil ca revoke ID` once `sigil ca status` shows LIVE 0 for it. Recorded in the ledger.
            """)
    @OptionGroup var authority: AuthorityArguments

    func run() async throws {
        try await authority.run("tainted \(authority.id): agents re-issue what chains to it; revoke it when `sigil ca status` shows LIVE 0") { ca throws(CAError) in
            try await ca.taint(authority.id, requester: "cli")
        }
    }
}

struct CARevoke: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "revoke",
        abstract: "Take a tainted authority out of use for good (a root leaves the trust bundle).",
        discussion: """
            Refuses until nothing live chains to it (the taint has completed), unless --force.
            An intermediate is not in the bundle (its root is): revoking it stops Sigil from using it;
            peers keep trusting its unexpired SVIDs until they expire, which the taint has already
            replaced. Recorded in the ledger.
            """)
    @OptionGroup var authority: AuthorityArguments
    @Flag(name: .long, help: "Revoke even with live SVIDs (their peers stop trusting them at once for a root).") var force = false

    func run() async throws {
        try await authority.run("revoked \(authority.id)") { ca throws(CAError) in try await ca.revoke(authority.id, force: force, requester: "cli") }
    }
}
