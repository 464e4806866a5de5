import CABackup
import Foundation
import Synchronization

/// A snapshot or restore started by the page, and how far it got: what `GET /api/jobs/ID`
/// answers.
struct JobStatus: Codable, Sendable {
    enum State: String, Codable, Sendable {
        case running, done, failed
    }

    var id: String
    /// `sync` or `restore`.
    var kind: String
    var repository: String
    var state: State = .running
    /// Files done so far (read or found unchanged; restored) and their bytes.
    var files: Int = 0
    var bytes: Int64 = 0
    /// Bytes in all, as far as known (0 until known).
    var totalBytes: Int64 = 0
    /// Bytes per second read or written so far.
    var rate: Double = 0
    /// Seconds left at that rate, when a total is known.
    var etaSeconds: Double?
    var error: String?
    /// The snapshot a finished sync saved.
    var snapshot: String?
    /// Entries a sync could not read, or a restore could not write.
    var warnings: [String] = []
    /// While the job waits out a network outage (a call to its server or object store being
    /// retried): the library's message, `waiting for the network: … does not answer (…);
    /// retrying`. Absent otherwise.
    var waiting: String?
}

/// The jobs of this process, by id: kept until it ends.
final class Jobs: Sendable {
    private let all = Mutex<[String: JobStatus]>([:])
    /// For each job of a remote repository: the `HOST:PORT` its calls go to, and the last
    /// network wait reported for it, with when (monotonic seconds).
    private let waits = Mutex<[String: (endpoint: String, message: String?, at: Double)]>([:])
    /// A wait is shown for this long after it was last reported: a call waiting out an
    /// outage retries (and reports again) at least every 2 s.
    static let waitShownSeconds = 5.0

    /// Registers a running job and returns its id. `location` is the repository's: a
    /// remote one's network waits are shown in the job (``noteWait(_:)``).
    func start(kind: String, repository: String, location: String? = nil) -> String {
        let id = hexString(secureRandomBytes(8))
        all.withLock { $0[id] = JobStatus(id: id, kind: kind, repository: repository) }
        if let endpoint = location.flatMap(Self.endpoint) { waits.withLock { $0[id] = (endpoint, nil, 0) } }
        return id
    }

    /// The `HOST:PORT` a remote location's calls go to (`http(s)://[NAME@]HOST:PORT…`,
    /// `s3:http(s)://HOST:PORT/…`), or nil for a local one.
    static func endpoint(_ location: String) -> String? {
        var rest = Substring(location)
        if rest.hasPrefix("s3:") { rest = rest.dropFirst(3) }
        guard rest.hasPrefix("http://") || rest.hasPrefix("https://"),
            let scheme = rest.range(of: "://")
        else { return nil }
        var authority = rest[scheme.upperBound...].prefix { $0 != "/" }
        if let at = authority.lastIndex(of: "@") { authority = authority[authority.index(after: at)...] }
        return authority.isEmpty ? nil : String(authority).lowercased()
    }

    /// A network wait the library reported (from any thread): shown in every running job
    /// whose repository's endpoint the message names (`scheme://HOST:PORT` followed by a
    /// space or a slash; a bucket's virtual host `BUCKET.HOST:PORT` too).
    func noteWait(_ message: String) {
        let now = monotonicSeconds()
        let lower = message.lowercased()
        waits.withLock { all in
            for (id, w) in all
            where [" ", "/"].contains(where: {
                lower.contains("//" + w.endpoint + $0) || lower.contains("." + w.endpoint + $0)
            }) {
                all[id] = (w.endpoint, message, now)
            }
        }
    }

    func update(_ id: String, _ change: (inout JobStatus) -> Void) {
        all.withLock { jobs in
            if var job = jobs[id] {
                change(&job)
                jobs[id] = job
            }
        }
    }

    func status(_ id: String) -> JobStatus? {
        guard var job = all.withLock({ $0[id] }) else { return nil }
        if job.state == .running, let w = waits.withLock({ $0[id] }), let message = w.message,
            monotonicSeconds() - w.at < Self.waitShownSeconds
        {
            job.waiting = message
        }
        return job
    }

    /// Runs `body` on `worker` as job `id`, recording its end.
    func run(
        _ id: String, on worker: RepositoryWorker,
        _ body: @escaping @Sendable (Repository) throws -> (snapshot: String?, warnings: [String])
    ) {
        Task {
            do {
                let result = try await worker.run(body)
                waits.withLock { _ = $0.removeValue(forKey: id) }
                update(id) {
                    $0.state = .done
                    $0.snapshot = result.snapshot
                    $0.warnings = result.warnings
                    $0.etaSeconds = 0
                }
            } catch {
                let message = (error as? UIError)?.message ?? "\(error)"
                waits.withLock { _ = $0.removeValue(forKey: id) }
                update(id) {
                    $0.state = .failed
                    $0.error = message
                }
            }
        }
    }

    /// Records a snapshot's progress in job `id`.
    func record(_ id: String, _ p: SnapshotProgress) {
        update(id) {
            $0.files = p.filesDone + p.filesUnchanged
            $0.bytes = p.bytesRead + p.bytesUnchanged
            $0.totalBytes = max(p.totalBytes, $0.bytes)
            $0.rate = p.elapsedSeconds > 0 ? Double(p.bytesRead) / p.elapsedSeconds : 0
            $0.etaSeconds =
                $0.rate > 0 && p.totalBytes > 0 ? Double(max(0, p.totalBytes - $0.bytes)) / $0.rate : nil
        }
    }

    /// Records a restore's progress in job `id`.
    func record(_ id: String, _ p: RestoreProgress) {
        update(id) {
            $0.files = p.filesDone
            $0.bytes = p.bytesWritten
            $0.rate = p.elapsedSeconds > 0 ? Double(p.bytesWritten) / p.elapsedSeconds : 0
            $0.etaSeconds =
                $0.rate > 0 && $0.totalBytes > 0 ? Double(max(0, $0.totalBytes - $0.bytes)) / $0.rate : nil
        }
    }
}
