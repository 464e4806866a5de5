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
}

/// The jobs of this process, by id: kept until it ends.
final class Jobs: Sendable {
    private let all = Mutex<[String: JobStatus]>([:])

    /// Registers a running job and returns its id.
    func start(kind: String, repository: String) -> String {
        let id = hexString(secureRandomBytes(8))
        all.withLock { $0[id] = JobStatus(id: id, kind: kind, repository: repository) }
        return id
    }

    func update(_ id: String, _ change: (inout JobStatus) -> Void) {
        all.withLock { jobs in
            if var job = jobs[id] {
                change(&job)
                jobs[id] = job
            }
        }
    }

    func status(_ id: String) -> JobStatus? { all.withLock { $0[id] } }

    /// Runs `body` on `worker` as job `id`, recording its end.
    func run(
        _ id: String, on worker: RepositoryWorker,
        _ body: @escaping @Sendable (Repository) throws -> (snapshot: String?, warnings: [String])
    ) {
        Task {
            do {
                let result = try await worker.run(body)
                update(id) {
                    $0.state = .done
                    $0.snapshot = result.snapshot
                    $0.warnings = result.warnings
                    $0.etaSeconds = 0
                }
            } catch {
                let message = (error as? UIError)?.message ?? "\(error)"
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
