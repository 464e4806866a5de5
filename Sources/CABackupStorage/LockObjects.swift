import CABackupCore
import CABackupFormat
import Foundation
import Synchronization

/// The repository lock on a storage that has none of its own (object storage, a storage
/// a program supplies): one small file per holder, of kind ``FileKind/lock``, as restic
/// keeps them.
///
/// A holder writes its lock object, then lists the others: a conflicting one that is
/// not stale makes it remove its own and fail with ``CABackupError/locked(_:)``. (Two
/// holders that write at the same moment may both back off; neither goes ahead wrongly.)
/// While held, a thread replaces the object with a fresh one every refresh interval
/// (``defaultRefreshInterval``); an object not refreshed for the stale time
/// (``defaultStaleAfter``: a process that died, a machine that lost power) is stale:
/// others ignore it and the next exclusive holder removes it. So a crash never needs a
/// manual unlock, only a wait of at most the stale time.
///
/// A lock object holds only its mode, its times and a random tag (no host or user
/// names, which an encrypted repository keeps from its storage). A hostile storage can
/// forge or hide lock objects: that can stop a snapshot or let a prune run beside one,
/// never make a snapshot reference a blob that is gone, since prune checks every
/// snapshot it can list.
public struct LockObjects: Sendable {
    /// How often a held lock object is renewed (restic: 5 minutes).
    public static let defaultRefreshInterval: Int64 = 5 * 60 * 1_000_000_000
    /// How long an object that is not renewed counts (restic: 30 minutes).
    public static let defaultStaleAfter: Int64 = 30 * 60 * 1_000_000_000

    let storage: any Storage
    /// Nanoseconds between refreshes.
    let refreshInterval: Int64
    /// Nanoseconds after its last refresh when an object no longer counts.
    let staleAfter: Int64

    public init(
        storage: any Storage, refreshInterval: Int64 = defaultRefreshInterval, staleAfter: Int64 = defaultStaleAfter
    ) {
        self.storage = storage
        self.refreshInterval = refreshInterval
        self.staleAfter = staleAfter
    }

    /// One lock object's content.
    struct Record: Codable, Equatable {
        var exclusive: Bool
        /// Wall-clock nanoseconds of the last refresh.
        var time: Int64
        /// Random, so two objects written at once have different names.
        var tag: String

        func encoded() -> [UInt8] {
            // Fields in a fixed order: the same record always has the same name.
            Array(#"{"exclusive":\#(exclusive),"tag":"\#(tag)","time":\#(time)}"#.utf8)
        }
    }

    /// Takes the lock: shared for writers that only add, exclusive for those that delete.
    /// - Throws: ``CABackupError/locked(_:)`` when a live holder conflicts.
    public func acquire(exclusive: Bool) throws -> RepositoryLock {
        try checkConflicts(exclusive: exclusive, own: nil)
        let own = try write(exclusive: exclusive)
        do {
            // Written first, checked after: of two that race, at least one sees the other.
            try checkConflicts(exclusive: exclusive, own: own)
        } catch {
            try? storage.remove(.lock, own)
            throw error
        }
        let stop = Atomic<Bool>(false)
        let current = Mutex<String>(own)
        let refresher = startThread { [self] in
            var last = wallClockNs()
            while !stop.load(ordering: .relaxed) {
                usleep(50_000)
                guard wallClockNs() - last >= refreshInterval, !stop.load(ordering: .relaxed) else { continue }
                // A new object first, then the old one goes: the lock is never absent.
                if let fresh = try? write(exclusive: exclusive) {
                    let old = current.withLock { (name) -> String in
                        defer { name = fresh }
                        return name
                    }
                    try? storage.remove(.lock, old)
                }
                last = wallClockNs()
            }
        }
        return RepositoryLock {
            stop.store(true, ordering: .relaxed)
            joinThread(refresher)
            try? storage.remove(.lock, current.withLock { $0 })
        }
    }

    /// Writes a fresh lock object and returns its name.
    private func write(exclusive: Bool) throws -> String {
        let record = Record(exclusive: exclusive, time: wallClockNs(), tag: hexString(secureRandomBytes(16)))
        let bytes = record.encoded()
        let name = sha256(bytes).hex
        try bytes.withUnsafeBytes { (raw) throws in try storage.put(.lock, name, bytes: raw) }
        return name
    }

    /// The live lock objects other than `own`, and removes stale ones when `exclusive`.
    private func checkConflicts(exclusive: Bool, own: String?) throws {
        let now = wallClockNs()
        for name in try storage.list(.lock) where name != own {
            guard let bytes = try? storage.read(.lock, name),
                let record = try? JSONDecoder().decode(Record.self, from: Data(bytes))
            else {
                continue  // removed meanwhile, or not a lock object: it holds nothing
            }
            if now - record.time > staleAfter {
                if exclusive { try? storage.remove(.lock, name) }
                continue
            }
            if exclusive || record.exclusive {
                throw CABackupError.locked(
                    record.exclusive
                        ? "a prune is running on \(storage.location) (its lock is renewed every \(refreshInterval / 60_000_000_000) minutes and lapses \(staleAfter / 60_000_000_000) minutes after the last renewal)"
                        : "a snapshot or another prune is running on \(storage.location) (a lock not renewed lapses after \(staleAfter / 60_000_000_000) minutes)"
                )
            }
        }
    }
}
