import CABackup
import Foundation
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One user's private data space: a repository directory in the same layout as a local
/// one (`DIR/spaces/NAME/`), plus the server's own index of which keyed blob ids each
/// pack holds (`index/server.sqlite`), the bytes used (for the quota) and the leases of
/// the repository lock. The server never holds a key: it reads only the clear part of
/// pack headers (ids and stored lengths).
final class Space: @unchecked Sendable {
    // Safe: `db`, `usedBytes`, `reservedBytes`, `uploads` and `leases` are only touched
    // with `lock` held.
    let user: String
    let root: String
    let storage: LocalStorage
    private let lock = NSLock()
    private let db: SQLiteDatabase
    private var usedBytes: Int64 = 0
    /// Bytes promised to uploads in progress: counted against the quota with the bytes
    /// stored, so parallel uploads cannot pass it together.
    private var reservedBytes: Int64 = 0
    /// Uploads in progress.
    private var uploads = 0
    private var leases: [String: (exclusive: Bool, expiresNs: Int64)] = [:]
    static let leaseNs: Int64 = 60_000_000_000

    /// Opens the space (created at registration), removes uploads a crash left behind,
    /// and brings the server index in step with the packs on disk.
    init(user: String, root: String) throws {
        self.user = user
        self.root = root
        storage = LocalStorage(path: root)
        try makeDirectories(root + "/index")
        try makeDirectories(root + "/tmp")
        for name in (try? readDirectory(Array((root + "/tmp").utf8))) ?? [] {
            unlink(root + "/tmp/" + String(decoding: name, as: UTF8.self))
        }
        db = try SQLiteDatabase(path: root + "/index/server.sqlite")
        try db.execute(
            """
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
            CREATE TABLE IF NOT EXISTS packs(id BLOB PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, pack BLOB NOT NULL, PRIMARY KEY(id, pack)) WITHOUT ROWID;
            CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
            """)
        try synchronize()
    }

    /// Indexes packs on disk the index lacks (a crash between rename and index) and drops
    /// rows of packs that are gone; recomputes the bytes used.
    private func synchronize() throws {
        let onDisk = Set(try storage.list(.pack))
        var indexed = Set<String>()
        let q = try db.prepare("SELECT id FROM packs")
        while try q.step() { if let id = q.id(0) { indexed.insert(id.hex) } }
        q.reset()
        for name in onDisk.subtracting(indexed) {
            let size = try storage.size(.pack, name)
            guard let entries = try? readClearEntries(name, size: size) else { continue }
            try index(pack: name, size: size, ids: entries)
        }
        for name in indexed.subtracting(onDisk) { try unindex(pack: name) }
        var used: Int64 = 0
        for kind in [FileKind.pack, .snapshot, .key] {
            for name in try storage.list(kind) { used += try storage.size(kind, name) }
        }
        if try storage.exists() { used += try storage.size(.config, "config") }
        usedBytes = used
    }

    private func readClearEntries(_ name: String, size: Int64) throws -> [BlobID] {
        let header = try PackFormat.readHeaderBytes(size: size) {
            try storage.read(.pack, name, offset: $0, length: $1, into: $2)
        }
        return try PackFormat.parseClearHeader(header, packSize: size).entries.map(\.id)
    }

    private func index(pack name: String, size: Int64, ids: [BlobID]) throws {
        guard let pack = ObjectID(hex: name) else { return }
        try db.execute("BEGIN")
        do {
            let p = try db.prepare("INSERT OR IGNORE INTO packs(id, size) VALUES (?, ?)")
            p.bind(1, pack)
            p.bind(2, size)
            try p.run()
            let b = try db.prepare("INSERT OR IGNORE INTO blobs(id, pack) VALUES (?, ?)")
            for id in ids {
                b.reset()
                b.bind(1, id)
                b.bind(2, pack)
                try b.run()
            }
            try db.execute("COMMIT")
        } catch {
            try? db.execute("ROLLBACK")
            throw error
        }
    }

    private func unindex(pack name: String) throws {
        guard let pack = ObjectID(hex: name) else { return }
        for sql in ["DELETE FROM blobs WHERE pack = ?", "DELETE FROM packs WHERE id = ?"] {
            // SQL-safe: sql is one of the two literals above.
            let s = try db.prepare(sql)
            s.bind(1, pack)
            try s.run()
        }
    }

    // MARK: Requests (each runs with `lock` held where it touches shared state)

    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    /// Which of `ids` no pack of the space holds.
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

    /// Bytes set aside for one upload: committed when the upload is stored, and given back
    /// by ``release(_:)`` (a no-op after the commit), which every caller defers.
    final class Reservation: @unchecked Sendable {
        // Safe: `bytes` is only touched with the space's lock held.
        fileprivate var bytes: Int64
        fileprivate init(_ bytes: Int64) { self.bytes = bytes }
    }

    func release(_ reservation: Reservation) {
        withLock {
            reservedBytes -= reservation.bytes
            reservation.bytes = 0
        }
    }

    /// Sets `bytes` aside for an upload, atomically with every other upload of the space,
    /// or refuses with 413 when the bytes stored and promised would pass the quota.
    func reserve(_ bytes: Int64, quota: Int64?) throws -> Reservation {
        try withLock {
            if let quota, usedBytes + reservedBytes + bytes > quota {
                throw APIError(
                    413,
                    "quota exceeded: the space holds \(usedBytes) of \(quota) bytes (\(reservedBytes) more promised to uploads in progress) and this upload needs \(bytes) more"
                )
            }
            reservedBytes += bytes
            return Reservation(bytes)
        }
    }

    /// Moves a reservation's bytes to the bytes stored (with `lock` held).
    private func commit(_ reservation: Reservation, size: Int64) {
        reservedBytes -= reservation.bytes
        reservation.bytes = 0
        usedBytes += size
    }

    /// Takes one of `limit` upload slots, or nil when all are taken (the caller answers
    /// 503 with Retry-After). Give it back with ``endUpload()``.
    func beginUpload(limit: Int) -> Bool {
        withLock {
            guard uploads < limit else { return false }
            uploads += 1
            return true
        }
    }

    func endUpload() { withLock { uploads -= 1 } }

    /// Verifies an uploaded pack in `temporary` (already hashed to `digest`) and stores it
    /// durably under `name`, then indexes it. Consumes the temporary file unless it throws.
    func storePack(
        name: String, temporary: String, fd: Int32, size: Int64, digest: ObjectID, reservation: Reservation
    )
        throws
    {
        guard digest.hex == name else {
            throw APIError(400, "pack content does not match its name (SHA-256 \(digest.hex)): upload it again")
        }
        let ids: [BlobID]
        do {
            let header = try PackFormat.readHeaderBytes(size: size) {
                try preadFully(fd, into: $2, count: $1, offset: $0, path: temporary)
            }
            let parsed = try PackFormat.parseClearHeader(header, packSize: size)
            guard parsed.sealed else {
                throw APIError(400, "pack header is not sealed: spaces hold encrypted repositories only")
            }
            ids = parsed.entries.map(\.id)
        } catch let e as APIError {
            throw e
        } catch {
            throw APIError(400, "pack is malformed (\(error)): upload it again")
        }
        if (try? storage.size(.pack, name)) != nil {  // stored already: harmless
            unlink(temporary)
            return
        }
        try storage.put(.pack, name, file: temporary)
        try withLock {
            try index(pack: name, size: size, ids: ids)
            commit(reservation, size: size)
        }
    }

    /// Stores a small file (config, key slot, snapshot record) atomically and durably.
    /// The config is written once: the check and the write happen under the space's lock,
    /// so of two concurrent first uploads exactly one is stored. At most `maxKeySlots` key
    /// slots are kept.
    func storeFile(_ kind: FileKind, _ name: String, _ bytes: [UInt8], quota: Int64?, maxKeySlots: Int) throws {
        let reservation = try reserve(Int64(bytes.count), quota: quota)
        defer { release(reservation) }
        try withLock {
            let existing = try? storage.size(kind, kind == .config ? "config" : name)
            if kind == .config && existing != nil {
                throw APIError(409, "the space already holds a repository: it is initialized once")
            }
            if existing != nil { return }
            if kind == .key, try storage.list(.key).count >= maxKeySlots {
                throw APIError(
                    409,
                    "the space holds \(maxKeySlots) key slots, the most it keeps: remove one with 'cabackup key remove' first"
                )
            }
            try bytes.withUnsafeBytes { try storage.put(kind, name, bytes: $0) }
            commit(reservation, size: Int64(bytes.count))
        }
    }

    func remove(_ kind: FileKind, _ name: String) throws -> Bool {
        guard let size = try? storage.size(kind, name) else { return false }
        try storage.remove(kind, name)
        try withLock {
            if kind == .pack { try unindex(pack: name) }
            usedBytes -= size
        }
        return true
    }

    /// Takes a lease on the repository lock, or nil when it conflicts.
    func acquire(exclusive: Bool) -> String? {
        withLock {
            let now = Accounts.nowNs()
            leases = leases.filter { $0.value.expiresNs > now }
            if exclusive ? !leases.isEmpty : leases.values.contains(where: \.exclusive) { return nil }
            let id = hexString(secureRandomBytes(16))
            leases[id] = (exclusive, now + Self.leaseNs)
            return id
        }
    }

    func renew(_ id: String) -> Bool {
        withLock {
            let now = Accounts.nowNs()
            guard let l = leases[id], l.expiresNs > now else { return false }
            leases[id] = (l.exclusive, now + Self.leaseNs)
            return true
        }
    }

    func release(_ id: String) -> Bool { withLock { leases.removeValue(forKey: id) != nil } }
}
