import CABackup
import Foundation
import Synchronization

/// How calls to a server or an object store are retried when the network fails them.
///
/// A call that fails in transport (connection refused or reset, no answer in time) is
/// retried with exponential back-off (0.25 s doubling to 2 s, jittered). Before the
/// endpoint ever answered in this process, a few attempts are made (a wrong address
/// fails in about a second); once it has answered, a failure is taken for an outage and
/// the call is retried for up to ``window`` seconds (default 300; `CABACKUP_RETRY_SECONDS`
/// sets it), so a backup or a restore outlives a dropped Wi-Fi or a restarting server and
/// costs only the calls that were in flight. Answers of 5xx are retried a few times;
/// `503` waits as long as its `Retry-After` asks.
enum RetryPolicy {
    /// Seconds a call keeps retrying transport failures once the endpoint answered before.
    static let window: Double = {
        if let s = ProcessInfo.processInfo.environment["CABACKUP_RETRY_SECONDS"], let v = Double(s), v >= 0 {
            return v
        }
        return 300
    }()

    /// Attempts for a transport failure before the endpoint ever answered, and for a 5xx answer.
    static let fewAttempts = 4

    /// The wait before retry number `attempt` (1 for the first retry): exponential with jitter,
    /// so many clients do not retry in step.
    static func backoff(attempt: Int, first: Double = 0.25) -> Double {
        // At most 2 s: during an outage a retry is a refused connection or a quick
        // timeout, cheap for both sides, and the link's return is noticed within 2 s.
        let base = min(first * Double(1 << min(attempt - 1, 10)), 2)
        return base * Double.random(in: 0.5...1.0)
    }

    /// Whether to retry a transport failure after `attempt` attempts, given the
    /// endpoint's history (``LastAnswer``): the window runs from the first failure since
    /// its last answer, not from this call, so calls made one after another during an
    /// outage do not each wait the whole window again.
    static func retriesTransport(attempt: Int, lastAnswer: LastAnswer) -> Bool {
        guard let failing = lastAnswer.failed() else { return attempt < fewAttempts }
        return failing < window
    }
}

/// Whether an endpoint answered a call of this process (any answer, error statuses
/// included), and since when it has been failing: what tells an outage from a wrong
/// address, and how long the outage has lasted.
final class LastAnswer: Sendable {
    private let state = Mutex<(answered: Bool, failingSince: UInt64?)>((false, nil))

    /// Notes an answer: the endpoint is up.
    func record() { state.withLock { $0 = (true, nil) } }

    /// Notes a transport failure; returns how many seconds the endpoint has been failing
    /// since its last answer, or nil when it never answered.
    func failed() -> Double? {
        let now = monotonicNanoseconds()
        return state.withLock { s -> Double? in
            guard s.answered else { return nil }
            let since = s.failingSince ?? now
            s.failingSince = since
            return Double(now - since) / 1e9
        }
    }

    var answered: Bool { state.withLock { $0.answered } }
}

/// Tells a program when a call is waiting for the network (a transport failure being
/// retried), so it can say so while a backup or a restore seems to stand still.
public enum NetworkWaits {
    private static let handler = Mutex<(@Sendable (String) -> Void)?>(nil)

    /// Installs the function called with a one-line message each time a call waits
    /// before retrying (from whichever thread made the call); `nil` removes it.
    public static func onWait(_ body: (@Sendable (String) -> Void)?) {
        handler.withLock { $0 = body }
    }

    static func report(_ message: String) {
        let h = handler.withLock { $0 }
        h?(message)
    }
}
