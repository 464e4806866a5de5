import CABackup
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Bytes set aside for one upload: moved to the bytes stored when the upload is recorded
/// (``SpaceRecords/stored(_:_:size:blobs:reservation:)``), and given back by
/// ``SpaceRecords/release(_:)`` (a no-op after that), which every caller defers.
final class Reservation: Sendable {
    /// Its id in the records that hold it.
    let id: String
    let bytes: Int64
    /// Whether it was recorded as stored or released.
    let settled = Atomic(false)

    init(id: String, bytes: Int64) {
        self.id = id
        self.bytes = bytes
    }

    /// Marks it settled; false when it already was (so only the first settling counts).
    func settle() -> Bool { !settled.exchange(true, ordering: .acquiringAndReleasing) }
}

/// A space's shared state beside its files: which keyed blob ids each pack holds, the
/// bytes stored and promised to uploads (the quota), and the leases of its repository
/// lock. The embedded default is ``SQLiteSpaceRecords`` (one server); an implementation
/// shared by several server instances must make ``reserve(_:quota:)``, lease takeovers
/// and ``claimConfig()`` atomic among them.
protocol SpaceRecords: Sendable {
    /// Which of `ids` no pack of the space holds.
    func missing(_ ids: [BlobID]) async throws -> [BlobID]
    /// Sets `bytes` aside for an upload, atomically with every other upload of the space,
    /// or refuses with 413 when the bytes stored and promised would pass `quota`.
    func reserve(_ bytes: Int64, quota: Int64?) async throws -> Reservation
    /// Gives a reservation's bytes back (a no-op when it was recorded as stored).
    func release(_ reservation: Reservation) async
    /// Keeps a reservation from lapsing while its upload still arrives (uploads call it
    /// about once a minute). Never fails: a reservation that lapses only lets the quota be
    /// passed by the bytes of uploads in progress.
    func extend(_ reservation: Reservation) async
    /// Records a file the storage now holds: its bytes count as stored instead of the
    /// reservation's, and a pack's blob ids are indexed. A pack recorded before counts
    /// once; recording it again only completes its index.
    func stored(
        _ kind: FileKind, _ name: String, size: Int64, blobs: [BlobID], reservation: Reservation)
        async throws
    /// Records a file the storage no longer holds.
    func removed(_ kind: FileKind, _ name: String, size: Int64) async throws
    /// Whether this upload may write the space's config: true once per space (until
    /// ``unclaimConfig()``), so of two concurrent first uploads exactly one is stored.
    func claimConfig() async throws -> Bool
    /// Gives up a claim whose config could not be stored.
    func unclaimConfig() async throws
    /// Takes a lease on the repository lock for its lifetime (60 s unless the records were
    /// made with another), or nil when it conflicts.
    /// A `key` the client sent with an earlier request that took a lease still held gets
    /// that lease again, so a retried request does not take a second one.
    func acquire(exclusive: Bool, key: String?) async throws -> String?
    /// Extends a lease still held; false when it lapsed or was released.
    func renew(_ id: String) async throws -> Bool
    /// Releases a lease; false when none had that id.
    func releaseLease(_ id: String) async throws -> Bool
    /// The names of the packs indexed.
    func indexedPacks() async throws -> Set<String>
    /// Brings the records in line with the files the storage holds (after a crash between
    /// storing a file and recording it, or records lost): indexes the packs in `add`,
    /// drops the packs in `drop`, and sets the bytes stored and whether a config is (nil:
    /// leaves them).
    func reconcile(
        add: [(name: String, size: Int64, blobs: [BlobID])], drop: Set<String>, usedBytes: Int64?, hasConfig: Bool?)
        async throws
    /// Brings the records in line with what `scan` finds, given the packs indexed, as
    /// ``reconcile(add:drop:usedBytes:hasConfig:)`` does; records shared by instances
    /// hold the space's usage for the whole pass, so an upload recorded while the storage
    /// is listed waits and then counts once. Returns the bytes stored the records counted
    /// before.
    func reconcile(holding scan: @Sendable (Set<String>) async throws -> ReconcileFound) async throws -> Int64
    /// The bytes stored and the bytes promised to uploads in progress, as the quota counts
    /// them.
    func usage() async throws -> (used: Int64, reserved: Int64)
    /// Whether other server instances share these records: then a space opened here is
    /// only added to (see ``Space/reconcile(full:)``).
    var shared: Bool { get }
}

/// What a reconciliation pass found in a space's storage: packs to index, packs to drop,
/// and (for a full pass) the bytes stored and whether a config is.
struct ReconcileFound: Sendable {
    var add: [(name: String, size: Int64, blobs: [BlobID])] = []
    var drop: Set<String> = []
    var usedBytes: Int64?
    var hasConfig: Bool?
}

extension SpaceRecords {
    /// For records one server alone changes: nothing runs beside the pass.
    func reconcile(holding scan: @Sendable (Set<String>) async throws -> ReconcileFound) async throws -> Int64 {
        let before = try await usage().used
        let found = try await scan(try await indexedPacks())
        try await reconcile(add: found.add, drop: found.drop, usedBytes: found.usedBytes, hasConfig: found.hasConfig)
        return before
    }
}

extension APIError {
    /// The 413 every ``SpaceRecords`` refuses a reservation with.
    static func quotaExceeded(used: Int64, quota: Int64, promised: Int64, asked: Int64) -> APIError {
        var e = APIError(
            413,
            "quota exceeded: the space holds \(used) of \(quota) bytes (\(promised) more promised to uploads in progress) and this upload needs \(asked) more"
        )
        e.refusesQuota = true
        return e
    }
}

/// How long a lease lasts without renewal (clients renew every 20 s).
let defaultLeaseLifetime = Duration.seconds(60)

/// `d` in nanoseconds.
func nanoseconds(_ d: Duration) -> Int64 {
    d.components.seconds * 1_000_000_000 + d.components.attoseconds / 1_000_000_000
}

/// The records of one space of a single server: the blob index in the space's
/// `index/server.sqlite`; bytes used (recomputed from the files at every start),
/// reservations and leases in memory.
final class SQLiteSpaceRecords: SpaceRecords, @unchecked Sendable {
    // Safe: every var below and `db` are only touched with `lock` held.
    private let lock = NSLock()
    private let db: SQLiteDatabase
    private var usedBytes: Int64 = 0
    private var reservedBytes: Int64 = 0
    private var configClaimed = false
    private var leases: [String: (exclusive: Bool, expiresNs: Int64, key: String?)] = [:]
    private let leaseLifetimeNs: Int64

    /// A lease lapses `leaseLifetime` after it was taken or last renewed.
    init(indexPath: String, leaseLifetime: Duration = defaultLeaseLifetime) throws {
        leaseLifetimeNs = nanoseconds(leaseLifetime)
        db = try SQLiteDatabase(path: indexPath)
        try db.execute(
            """
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS packs(id BLOB PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, pack BLOB NOT NULL, PRIMARY KEY(id, pack)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
            """)
    }

    private func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    func missing(_ ids: [BlobID]) throws -> [BlobID] {
        try withLock {
            let q = try db.prepare("SELECT 1 FROM blobs WHERE id = ? LIMIT 1")
            var out: [BlobID] = []
            for id in ids {
                q.reset()
                q.bind(1, id)
                if try !q.step() { out.append(id) }
            }
            q.reset()
            return out
        }
    }

    func reserve(_ bytes: Int64, quota: Int64?) throws -> Reservation {
        try withLock {
            if let quota, usedBytes + reservedBytes + bytes > quota {
                throw APIError.quotaExceeded(used: usedBytes, quota: quota, promised: reservedBytes, asked: bytes)
            }
            reservedBytes += bytes
            return Reservation(id: "", bytes: bytes)
        }
    }

    func release(_ reservation: Reservation) {
        withLock { if reservation.settle() { reservedBytes -= reservation.bytes } }
    }

    /// Reservations here never lapse: the server that holds them counts them in memory.
    func extend(_ reservation: Reservation) {}

    func stored(_ kind: FileKind, _ name: String, size: Int64, blobs: [BlobID], reservation: Reservation) throws {
        try withLock {
            // A pack counts once; stored again, it is only indexed.
            let new = kind == .pack ? try index(pack: name, size: size, ids: blobs) : true
            if reservation.settle() { reservedBytes -= reservation.bytes }
            if new { usedBytes += size }
        }
    }

    func removed(_ kind: FileKind, _ name: String, size: Int64) throws {
        try withLock {
            // A pack's bytes leave with its row, once (two removals at once count one).
            let counted = kind == .pack ? try unindex(pack: name) : true
            if kind == .config { configClaimed = false }
            if counted { usedBytes -= size }
        }
    }

    func claimConfig() -> Bool {
        withLock {
            if configClaimed { return false }
            configClaimed = true
            return true
        }
    }

    func unclaimConfig() { withLock { configClaimed = false } }

    func acquire(exclusive: Bool, key: String?) -> String? {
        withLock {
            let now = Accounts.nowNs()
            leases = leases.filter { $0.value.expiresNs > now }
            if let key, let held = leases.first(where: { $0.value.key == key && $0.value.exclusive == exclusive }) {
                return held.key
            }
            if exclusive ? !leases.isEmpty : leases.values.contains(where: \.exclusive) { return nil }
            let id = hexString(secureRandomBytes(16))
            leases[id] = (exclusive, now + leaseLifetimeNs, key)
            return id
        }
    }

    func renew(_ id: String) -> Bool {
        withLock {
            let now = Accounts.nowNs()
            guard let l = leases[id], l.expiresNs > now else { return false }
            leases[id] = (l.exclusive, now + leaseLifetimeNs, l.key)
            return true
        }
    }

    func releaseLease(_ id: String) -> Bool { withLock { leases.removeValue(forKey: id) != nil } }

    func indexedPacks() throws -> Set<String> {
        try withLock {
            var out = Set<String>()
            let q = try db.prepare("SELECT id FROM packs")
            while try q.step() { if let id = q.id(0) { out.insert(id.hex) } }
            q.reset()
            return out
        }
    }

    func reconcile(
        add: [(name: String, size: Int64, blobs: [BlobID])], drop: Set<String>, usedBytes used: Int64?,
        hasConfig: Bool?
    ) throws {
        try withLock {
            for pack in add { try index(pack: pack.name, size: pack.size, ids: pack.blobs) }
            for name in drop { try unindex(pack: name) }
            if let used { usedBytes = used }
            if let hasConfig { configClaimed = hasConfig }
        }
    }

    func usage() -> (used: Int64, reserved: Int64) { withLock { (usedBytes, reservedBytes) } }

    var shared: Bool { false }

    /// Indexes a pack; returns whether it was not indexed before.
    @discardableResult
    private func index(pack name: String, size: Int64, ids: [BlobID]) throws -> Bool {
        guard let pack = ObjectID(hex: name) else { return false }
        try db.execute("BEGIN")
        do {
            let p = try db.prepare("INSERT OR IGNORE INTO packs(id, size) VALUES (?, ?)")
            p.bind(1, pack)
            p.bind(2, size)
            try p.run()
            let new = db.changes > 0
            let b = try db.prepare("INSERT OR IGNORE INTO blobs(id, pack) VALUES (?, ?)")
            for id in ids {
                b.reset()
                b.bind(1, id)
                b.bind(2, pack)
                try b.run()
            }
            try db.execute("COMMIT")
            return new
        } catch {
            try? db.execute("ROLLBACK")
            throw error
        }
    }

    /// Drops a pack from the index; returns whether it was indexed.
    @discardableResult
    private func unindex(pack name: String) throws -> Bool {
        guard let pack = ObjectID(hex: name) else { return false }
        var indexed = false
        for sql in ["DELETE FROM blobs WHERE pack = ?", "DELETE FROM packs WHERE id = ?"] {
            // SQL-safe: sql is one of the two literals above.
            let s = try db.prepare(sql)
            s.bind(1, pack)
            try s.run()
            indexed = db.changes > 0
        }
        return indexed
    }
}
