import CoreFoundation
import Foundation
import Logging
import NIOConcurrencyHelpers
public import SigilCore
import SigilPolicy

/// What the proxy enforces at one moment, compiled once per policy load: the AuthorizationPolicies
/// that apply to this workload (namespace + labels), the PeerAuthentication mode, and the kill
/// switch. Immutable; a reload builds a new one.
public struct EnforcementState: Sendable {
    public let workload: WorkloadSelector
    public let applicable: [AuthorizationPolicy]
    public let evaluator: PolicyEvaluator
    /// ``applicable`` split by action, with names built: what each request is evaluated against.
    let prepared: PreparedPolicies
    /// The mTLS mode for the app's port (the `--mtls` override, else PeerAuthentication).
    public let baseMode: PeerAuthentication.Mode
    /// The mode in force: PERMISSIVE while the kill switch is on, else ``baseMode``.
    public var mode: PeerAuthentication.Mode { killSwitch != nil ? .permissive : baseMode }
    /// Set when the kill switch is on: PERMISSIVE and allow-all, whatever the policies say.
    public let killSwitch: String?
    /// Lowercased names of request headers that rules read (only these are collected).
    public let headerNames: [String]
    /// Counts loads, starting at 1.
    public let generation: Int

    init(set: PolicySet, workload: WorkloadSelector, rootNamespace: String, modeOverride: PeerAuthentication.Mode?,
         appPort: Int, killSwitch: String?, generation: Int) {
        self.workload = workload
        let evaluator = PolicyEvaluator(policies: set.authorizationPolicies, rootNamespace: rootNamespace)
        self.evaluator = evaluator
        self.applicable = evaluator.applicable(to: workload)
        self.prepared = PreparedPolicies(applicable)
        let resolved = PeerAuthenticationResolver(policies: set.peerAuthentications, rootNamespace: rootNamespace)
            .mode(for: workload, port: appPort)
        self.killSwitch = killSwitch
        self.baseMode = modeOverride ?? resolved
        self.headerNames = AuthorizationPolicy.headerNamesRead(by: applicable)
        self.generation = generation
    }

    /// What a plaintext peer gets where the mode is STRICT (an unset mode is STRICT here).
    static let strictRefusal = AuthorizationDecision(allowed: false, policy: "PeerAuthentication STRICT", rule: nil)

    /// True when this state refuses a plaintext (`mtls` false) peer: a connection accepted under
    /// PERMISSIVE or the kill switch that is still open after the mode became STRICT.
    func refusesPlaintext(mtls: Bool) -> Bool {
        !mtls && (mode == .strict || mode == .unset)
    }

    /// ``decide(_:)`` for a peer that came with (`mtls`) or without a certificate: a plaintext one
    /// is refused first where the mode is STRICT.
    func decide(_ request: AuthorizationRequest, mtls: Bool) -> AuthorizationDecision {
        refusesPlaintext(mtls: mtls) ? Self.strictRefusal : decide(request)
    }

    /// True when every request is allowed without looking at it (no applicable policy, or kill switch).
    public var allowsEverything: Bool { killSwitch != nil || applicable.isEmpty }

    public func decide(_ request: AuthorizationRequest) -> AuthorizationDecision {
        if killSwitch != nil { return AuthorizationDecision(allowed: true, policy: "kill-switch", rule: nil) }
        if applicable.isEmpty { return AuthorizationDecision(allowed: true) }
        return evaluator.evaluate(request, prepared: prepared)
    }
}

/// Holds the current ``EnforcementState`` and reloads it when the policy directory or the kill
/// switch file changes (polled once a second: works on every filesystem, no inotify limits). A
/// directory that fails to load leaves the last good state in force, logged and recorded.
public final class PolicyStore: Sendable {
    public struct Settings: Sendable {
        public var policiesPath: String
        public var killSwitchPath: String
        public var workload: WorkloadSelector
        public var rootNamespace: String
        public var modeOverride: PeerAuthentication.Mode?
        public var appPort: Int
    }

    let settings: Settings
    private let box: NIOLockedValueBox<EnforcementState>
    private let fingerprint: NIOLockedValueBox<[FileStamp]>
    private let logger: Logger
    private let record: @Sendable (LedgerRecord) -> Void
    /// Called with each new state after a reload (the TCP connections' re-check).
    private let observers = NIOLockedValueBox<[@Sendable (EnforcementState) -> Void]>([])

    /// Loads the policies once; a load error here stops the proxy (there is no last good set yet).
    init(settings: Settings, logger: Logger, record: @escaping @Sendable (LedgerRecord) -> Void) throws {
        self.settings = settings
        self.logger = logger
        self.record = record
        let set: PolicySet
        do {
            set = try PolicyLoader.load(path: settings.policiesPath)
        } catch {
            throw ProxyError(.policy, "cannot load --policies: \(error.description)")
        }
        let kill = Self.readKillSwitch(settings.killSwitchPath)
        box = NIOLockedValueBox(EnforcementState(set: set, workload: settings.workload, rootNamespace: settings.rootNamespace,
                                                 modeOverride: settings.modeOverride, appPort: settings.appPort,
                                                 killSwitch: kill, generation: 1))
        fingerprint = NIOLockedValueBox(Self.fingerprint(settings))
        for warning in set.warnings { logger.warning("\(warning)") }
        if let kill {
            logger.warning("kill switch is ON: PERMISSIVE and allow-all", metadata: ["reason": "\(kill)"])
        }
    }

    public var current: EnforcementState { box.withLockedValue { $0 } }

    /// Calls `observer` with every state a reload puts in force, after it is in force.
    func onChange(_ observer: @escaping @Sendable (EnforcementState) -> Void) {
        observers.withLockedValue { $0.append(observer) }
    }


    /// Polls for changes until cancelled.
    func watch(every interval: Duration = .seconds(1)) async {
        while !Task.isCancelled {
            try? await Task.sleep(for: interval)
            reloadIfChanged()
        }
    }

    /// Reloads when the directory listing, a policy file or the kill switch changed (``FileStamp``).
    @discardableResult
    func reloadIfChanged(now: Int64 = ProxyClock.nowMicros()) -> Bool {
        let print = Self.fingerprint(settings)
        let changed = fingerprint.withLockedValue { old -> Bool in
            guard old != print else { return false }
            old = print
            return true
        }
        guard changed else { return false }
        let previous = current
        let kill = Self.readKillSwitch(settings.killSwitchPath)
        if (kill != nil) != (previous.killSwitch != nil) {
            record(LedgerRecord(kind: kill != nil ? .killSwitchOn : .killSwitchOff, timeMicros: now,
                                detail: kill ?? "kill switch removed; policies enforced again"))
            if let kill {
                logger.warning("kill switch turned ON: PERMISSIVE and allow-all", metadata: ["reason": "\(kill)"])
            } else {
                logger.warning("kill switch turned OFF: policies enforced again")
            }
        }
        do {
            let set = try PolicyLoader.load(path: settings.policiesPath)
            let next = EnforcementState(set: set, workload: settings.workload, rootNamespace: settings.rootNamespace,
                                        modeOverride: settings.modeOverride, appPort: settings.appPort,
                                        killSwitch: kill, generation: previous.generation + 1)
            box.withLockedValue { $0 = next }
            for warning in set.warnings { logger.warning("\(warning)") }
            let names = next.applicable.map(\.qualifiedName).joined(separator: ",")
            logger.info("policies reloaded", metadata: ["policy": "\(names)", "mode": "\(next.mode.rawValue)"])
            record(LedgerRecord(kind: .policyReload, timeMicros: now,
                                detail: "generation \(next.generation): mode \(next.mode.rawValue); applicable: [\(names)]"))
        } catch {
            // Keep enforcing the last good set, but a kill-switch change still applies.
            let next = EnforcementState(copying: previous, killSwitch: kill)
            box.withLockedValue { $0 = next }
            logger.error("policy reload failed; keeping the last good policies", metadata: ["error": "\(error.description)"])
            record(LedgerRecord(kind: .policyRejected, timeMicros: now, detail: error.description))
        }
        let next = current
        for observer in observers.withLockedValue({ $0 }) { observer(next) }
        return true
    }

    static func readKillSwitch(_ path: String) -> String? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let text = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        return text.isEmpty ? "kill switch on (no reason given)" : text
    }

    /// What the watcher compares from one poll to the next: for every policy file (or the one
    /// file `--policies` names) and the kill switch, what `stat(2)` says of the file it resolves to.
    static func fingerprint(_ settings: Settings) -> [FileStamp] {
        var stamps: [FileStamp] = []
        if let names = FileStamp.policyFileNames(inDirectory: settings.policiesPath) {
            for name in names { stamps.append(FileStamp(path: settings.policiesPath + "/" + name)) }
        } else {
            stamps.append(FileStamp(path: settings.policiesPath))
        }
        stamps.append(FileStamp(path: settings.killSwitchPath))
        return stamps
    }
}

extension EnforcementState {
    init(copying previous: EnforcementState, killSwitch: String?) {
        self.workload = previous.workload
        self.applicable = previous.applicable
        self.prepared = previous.prepared
        self.evaluator = previous.evaluator
        self.headerNames = previous.headerNames
        self.killSwitch = killSwitch
        self.baseMode = previous.baseMode
        self.generation = previous.generation + 1
    }
}

/// Wall-clock time for ledger rows.
enum ProxyClock {
    static func nowMicros() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
    }
}
