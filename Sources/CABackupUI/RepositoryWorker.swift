import CABackup
import Dispatch
import Foundation
import Synchronization

/// One configured repository's thread: every library call on it runs here, one at a time,
/// off the server's event loops. It holds the opened repository (and so the keys the
/// password unlocked) in memory only; forgetting it drops them.
final class RepositoryWorker: @unchecked Sendable {
    let name: String
    /// Runs the calls in order, one at a time.
    private let queue: DispatchQueue
    /// The opened repository, touched only on ``queue``.
    private var repository: Repository?
    /// Whether ``repository`` is set, readable from any thread.
    private let isUnlocked = Atomic(false)
    /// The last check for changes (from the schedule or a request).
    let lastCheck = Mutex<ChangesAnswer?>(nil)
    /// When the schedule last started a check, in monotonic seconds.
    let lastScheduled = Mutex<Double?>(nil)
    /// Whether a scheduled check is queued or running (the next waits for its end, so slow
    /// checks do not pile up).
    let scheduledCheckRunning = Atomic(false)
    /// The change set the last desktop notification told of (nil: none, or nothing changed
    /// since), so that the same changes are not announced at every check.
    let lastNotified = Mutex<String?>(nil)

    init(name: String) {
        self.name = name
        queue = DispatchQueue(label: "cabackup.ui.repository.\(name)")
    }

    var unlocked: Bool { isUnlocked.load(ordering: .relaxed) }

    /// Runs `body` on the repository's thread with the opened repository.
    ///
    /// - Throws: ``UIError`` 423 when it is locked (no password entered yet), or what
    ///   `body` throws.
    func run<T: Sendable>(_ body: @escaping @Sendable (Repository) throws -> T) async throws -> T {
        try await withRepository { repository in
            guard let repository else { throw UIError.locked(self.name) }
            return try body(repository)
        }
    }

    /// Opens the repository at `location` with `password` (or, with `initialize`, creates it
    /// there) and keeps it open.
    func unlock(location: String, password: String?, initialize kdf: KDFParameters?) async throws {
        try await withRepository { current in
            let opened =
                if let kdf {
                    try Repository.initialize(path: location, password: password, kdf: kdf)
                } else {
                    try Repository.open(
                        path: location,
                        passwordProvider: {
                            guard let password else { throw CABackupError.passwordRequired(location) }
                            return password
                        })
                }
            self.set(opened)
        }
    }

    /// Closes the repository: the keys are dropped from memory.
    func lock() async {
        _ = try? await withRepository { _ in self.set(nil) }
    }

    private func set(_ repository: Repository?) {
        self.repository = repository
        isUnlocked.store(repository != nil, ordering: .relaxed)
    }

    private func withRepository<T: Sendable>(
        _ body: @escaping @Sendable (Repository?) throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            queue.async {
                continuation.resume(with: Result { try body(self.repository) })
            }
        }
    }
}

/// An error answered as `{"error": message}` with an HTTP status.
struct UIError: Error, Sendable {
    let status: Int
    let message: String

    init(_ status: Int, _ message: String) {
        self.status = status
        self.message = message
    }

    /// 423: the repository has not been unlocked in this process.
    static func locked(_ name: String) -> UIError {
        UIError(423, "the repository '\(name)' is locked: unlock it with its password first")
    }

    /// The status and message a library error is answered with.
    init(_ error: CABackupError) {
        let status =
            switch error {
            case .wrongPassword, .passwordRequired: 403
            case .snapshotNotFound, .pathNotInSnapshot, .repositoryNotFound, .notARepository: 404
            case .badSnapshotReference, .ambiguousSnapshot, .invalidArgument, .unreadableSource, .targetNotEmpty,
                .repositoryExists, .unsupportedLocation:
                400
            case .locked: 409
            case .notLoggedIn: 403
            case .remote(let status, _) where (400..<500).contains(status): status
            case .network: 502
            default: 500
            }
        self.init(status, "\(error)")
    }
}
