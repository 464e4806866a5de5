import CABackupCore
import CABackupFormat
import CSQLite

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Where a blob is stored.
public struct BlobLocation: Sendable, Equatable {
    public var pack: PackID
    public var type: BlobType
    public var compression: BlobCompression
    public var offset: Int64
    public var length: Int
    public var rawLength: Int

    /// The location of a pack header entry.
    public init(pack: PackID, entry e: PackEntry) {
        self.init(
            pack: pack, type: e.type, compression: e.compression, offset: e.offset, length: e.length,
            rawLength: e.rawLength)
    }

    public init(
        pack: PackID, type: BlobType, compression: BlobCompression, offset: Int64, length: Int, rawLength: Int
    ) {
        self.pack = pack
        self.type = type
        self.compression = compression
        self.offset = offset
        self.length = length
        self.rawLength = rawLength
    }
}

/// The SQLite index: which pack holds each blob, and the snapshot list.
///
/// Derived data only: everything in it comes from pack headers and snapshot records, so
/// deleting `index/` loses nothing; ``Repository`` rebuilds or catches it up on open.
/// All calls are serialized by one lock; the connection runs in WAL mode.
///
/// Schema (see docs/format.md):
/// ```sql
/// meta(key TEXT PRIMARY KEY, value TEXT)
/// packs(n INTEGER PRIMARY KEY, id BLOB UNIQUE, size INTEGER, blob_count INTEGER)
/// blobs(id BLOB, pack INTEGER, type, compression, offset, length, raw_length,
///       PRIMARY KEY(id, pack)) WITHOUT ROWID
/// snapshots(id BLOB PRIMARY KEY, time_ns INTEGER, record BLOB)
/// ```
final class RepositoryIndex: @unchecked Sendable {
    // Safe: `db` and the statements are only used with `lock` held.
    static let schemaVersion = "1"
    private let lock = Condition()
    private let db: SQLiteDatabase
    private let lookupStmt: SQLiteStatement
    private let containsStmt: SQLiteStatement
    private let insertBlobStmt: SQLiteStatement
    private let insertPackStmt: SQLiteStatement
    /// When the read transaction shared by lookups began (monotonic ns); nil: none open.
    private var readSince: UInt64?
    /// Callers inside ``sharingReads(_:)``.
    private var sharing = 0
    /// The absent-id filter (see ``dedupFilter()``): loaded or built on first use; `nil`
    /// before that and once disabled.
    private var filter: IDFilter?
    private var filterState = FilterState.unloaded
    private let filterPath: String
    /// What ``IDFilter/touch(_:)`` returned, kept so its loads are not optimized away.
    private var touched: UInt64 = 0
    private enum FilterState { case unloaded, clean, dirty, disabled }
    /// The sorted id table (see ``trustedTable()``), loaded or built with the filter.
    private var table: IDTable?
    private let tablePath: String
    /// Below this many indexed ids no table is kept (SQLite's cache holds such an index).
    private let tableMinimum: Int
    /// The read transaction in which the table was last found still valid.
    private var tableTrustedIn: UInt64?
    /// Counts read transactions begun, to tell them apart.
    private var readTransaction: UInt64 = 0

    /// Opens (creating if needed) the index at `path` for the repository `repositoryID`.
    /// An index of another schema or repository is discarded and recreated empty.
    /// `idTableMinimum`: how many ids the index must hold before a sorted id table
    /// (``IDTable``) is kept beside it.
    init(path: String, repositoryID: String, idTableMinimum: Int = 262_144) throws {
        var ok = false
        do {
            let probe = try SQLiteDatabase(path: path)
            ok = (try? RepositoryIndex.check(probe, repositoryID: repositoryID)) ?? false
        }  // The probe connection is closed here, before any file is removed.
        if !ok {
            // Another schema or another repository's index: it is derived data, start over.
            for suffix in ["", "-wal", "-shm", "-filter", "-ids"] { unlink(path + suffix) }
        }
        db = try SQLiteDatabase(path: path)
        filterPath = path + "-filter"
        tablePath = path + "-ids"
        tableMinimum = idTableMinimum
        chmod(path, 0o600)
        try db.execute(
            """
            PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-16384;
            CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
            CREATE TABLE IF NOT EXISTS packs(n INTEGER PRIMARY KEY, id BLOB UNIQUE NOT NULL,
                size INTEGER NOT NULL, blob_count INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS blobs(id BLOB NOT NULL, pack INTEGER NOT NULL, type INTEGER NOT NULL,
                compression INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
                raw_length INTEGER NOT NULL, PRIMARY KEY(id, pack)) WITHOUT ROWID;
            DROP INDEX IF EXISTS blobs_by_pack;
            CREATE TABLE IF NOT EXISTS snapshots(id BLOB PRIMARY KEY, time_ns INTEGER NOT NULL,
                record BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS forgets(id BLOB PRIMARY KEY, forgotten BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS complete(snapshot BLOB PRIMARY KEY, packs_upto INTEGER NOT NULL,
                pack_count INTEGER NOT NULL, last_pack BLOB);
            INSERT OR IGNORE INTO meta VALUES('generation', '0');
            UPDATE meta SET value = (SELECT max(n) FROM packs)
                WHERE key = 'generation' AND CAST(value AS INTEGER) < (SELECT coalesce(max(n), 0) FROM packs);
            """)
        // Values go in as bound parameters only: the repository id comes from the config,
        // which the storage serves.
        let meta = try db.prepare("INSERT OR IGNORE INTO meta VALUES(?1, ?2)")
        for (key, value) in [
            ("schema", String(RepositoryIndex.schemaVersion)), ("repository", repositoryID),
            ("instance", ObjectID(bytes: secureRandomBytes(32))!.hex),
        ] {
            meta.bind(1, key)
            meta.bind(2, value)
            try meta.run()
            meta.reset()
        }
        lookupStmt = try db.prepare(
            """
            SELECT p.id, b.type, b.compression, b.offset, b.length, b.raw_length
            FROM blobs b JOIN packs p ON p.n = b.pack WHERE b.id = ?1 LIMIT 1
            """)
        containsStmt = try db.prepare("SELECT 1 FROM blobs WHERE id = ?1 LIMIT 1")
        insertBlobStmt = try db.prepare("INSERT OR IGNORE INTO blobs VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7)")
        insertPackStmt = try db.prepare("INSERT INTO packs(n, id, size, blob_count) VALUES(?1, ?2, ?3, ?4)")
    }

    /// Whether an existing file is this schema's index of this repository (a new,
    /// empty file has no `meta` table, fails the query, and is recreated: harmless).
    private static func check(_ db: SQLiteDatabase, repositoryID: String) throws -> Bool {
        let s = try db.prepare("SELECT key, value FROM meta")
        var meta: [String: String] = [:]
        while try s.step() { meta[s.text(0)] = s.text(1) }
        return meta["schema"] == schemaVersion && meta["repository"] == repositoryID
    }

    /// Inside ``sharingReads(_:)``, keeps one read transaction open across lookups. Each
    /// transaction of its own costs about 3 µs (WAL read locks are fcntl calls on the
    /// -shm file), a tenth of a small-file snapshot's CPU time. The shared transaction
    /// ends before any other call (so writes, ours or a rebuild's, never run inside it)
    /// and after 0.2 s at most; what another process indexes meanwhile is seen that much
    /// later, which can only make a concurrent snapshot store a blob twice (harmless).
    /// Outside, each lookup is its own transaction. Called with `lock` held.
    private func beginRead() throws {
        let now = monotonicNanoseconds()
        if let since = readSince, now &- since < 200_000_000 { return }
        endRead()
        try db.execute("BEGIN")
        readSince = now
        readTransaction &+= 1
    }

    /// Ends the read transaction unless lookups are being batched. Called with `lock` held.
    private func finishRead() {
        if sharing == 0 { endRead() }
    }

    /// Runs `body` (a snapshot, a restore) with lookups sharing read transactions; saves
    /// the absent-id filter afterwards if packs were added.
    func sharingReads<R>(_ body: () throws -> R) rethrows -> R {
        lock.locked { sharing += 1 }
        defer {
            lock.locked {
                sharing -= 1
                finishRead()
                if sharing == 0 { saveFilter() }
            }
        }
        return try body()
    }

    deinit {
        lock.locked {
            endRead()
            saveFilter()
        }
    }

    /// Ends the shared read transaction, if one is open. Called with `lock` held.
    private func endRead() {
        if readSince != nil {
            try? db.execute("COMMIT")
            readSince = nil
        }
    }

    /// Runs `body` with the lock held and no read transaction open.
    private func exclusive<R>(_ body: () throws -> R) rethrows -> R {
        try lock.locked {
            endRead()
            return try body()
        }
    }

    /// The location of a blob, or `nil` when no indexed pack holds it.
    func lookup(_ id: BlobID) throws -> BlobLocation? {
        lock.lock()
        defer { lock.unlock() }
        try beginRead()
        defer { finishRead() }
        lookupStmt.bind(1, id)
        defer { lookupStmt.reset() }
        guard try lookupStmt.step(), let pack = lookupStmt.id(0) else { return nil }
        guard let type = BlobType(rawValue: UInt8(truncatingIfNeeded: lookupStmt.int(1))),
            let comp = BlobCompression(rawValue: UInt8(truncatingIfNeeded: lookupStmt.int(2)))
        else { throw CABackupError.index("bad row for blob \(id.hex)") }
        return BlobLocation(
            pack: pack, type: type, compression: comp, offset: lookupStmt.int(3), length: Int(lookupStmt.int(4)),
            rawLength: Int(lookupStmt.int(5)))
    }

    /// Whether an indexed pack holds the blob, for deciding whether to store it: the
    /// absent-id filter answers most "no"s. It may answer "no" for a blob another process
    /// indexed after this one loaded the filter; the caller then stores it twice, which is
    /// harmless. ``lookup(_:)`` is always exact.
    func contains(_ id: BlobID) throws -> Bool {
        lock.lock()
        defer { lock.unlock() }
        if let filter = try dedupFilter(), !filter.mayContain(id) { return false }
        try beginRead()
        defer { finishRead() }
        if let table = try trustedTable(), table.contains(id) { return true }
        return try containsStmt.hasRow(binding: id)
    }

    /// The ids among `ids` that no indexed pack holds (one lock round trip for a whole
    /// directory instead of one per id). Like ``contains(_:)``, may include an id another
    /// process indexed after this one loaded its filter.
    func missing(_ ids: [BlobID]) throws -> Set<BlobID> {
        guard !ids.isEmpty else { return [] }
        return try lock.locked { () throws -> Set<BlobID> in
            let filter = try dedupFilter()
            if let filter { touched ^= filter.touch(ids) }
            var out = Set<BlobID>()
            var reading = false
            defer { if reading { finishRead() } }
            for id in ids {
                if let filter, !filter.mayContain(id) {
                    out.insert(id)
                    continue
                }
                if !reading {
                    try beginRead()
                    reading = true
                }
                if let table = try trustedTable(), table.contains(id) { continue }
                if !(try containsStmt.hasRow(binding: id)) { out.insert(id) }
            }
            return out
        }
    }

    /// Records a pack and all its blobs in one transaction, which also advances the
    /// index generation (see ``dedupFilter()``).
    func addPack(_ id: PackID, size: Int64, entries: [PackEntry]) throws {
        try exclusive { () throws in
            if filterState == .unloaded { loadSavedFilter() }
            try db.execute("BEGIN IMMEDIATE")
            do {
                let existing = try db.prepare("SELECT 1 FROM packs WHERE id = ?1")
                existing.bind(1, id)
                if try existing.step() {
                    // Already indexed (the same bytes were stored again): nothing to add.
                    try db.execute("ROLLBACK")
                    return
                }
                // Packs are numbered by the generation, which only grows and is at least
                // every number given (raised on open for older indexes), so a number is
                // never given twice, even after every pack was removed (see PackState).
                // Beyond the highest row too, should a writer of an older version have
                // numbered past the generation.
                let generation = try self.generation()
                let n = max(generation, try queryInt("SELECT coalesce(max(n), 0) FROM packs")) + 1
                insertPackStmt.bind(1, n)
                insertPackStmt.bind(2, id)
                insertPackStmt.bind(3, size)
                insertPackStmt.bind(4, entries.count)
                defer { insertPackStmt.reset() }
                try insertPackStmt.run()
                for e in entries {
                    insertBlobStmt.bind(1, e.id)
                    insertBlobStmt.bind(2, n)
                    insertBlobStmt.bind(3, Int(e.type.rawValue))
                    insertBlobStmt.bind(4, Int(e.compression.rawValue))
                    insertBlobStmt.bind(5, e.offset)
                    insertBlobStmt.bind(6, e.length)
                    insertBlobStmt.bind(7, e.rawLength)
                    try insertBlobStmt.run()
                    insertBlobStmt.reset()
                }
                // SQL-safe: n is an Int the index computed.
                try db.execute("UPDATE meta SET value = '\(n)' WHERE key = 'generation'")
                try db.execute("COMMIT")
                filterAdded(entries, before: generation)
            } catch {
                try? db.execute("ROLLBACK")
                throw error
            }
        }
    }

    // MARK: Complete snapshots

    /// Which packs the index holds, in a form that shows whether any of them has been
    /// removed since: the highest row number, the number of rows up to it and the id of
    /// that row. Rows are numbered upwards and a number is never given twice (see
    /// ``addPack(_:size:entries:)``), so "the same count up to the same number" holds
    /// exactly when none of those packs was removed; the id at it is checked as well.
    struct PackState: Equatable {
        var upTo: Int64
        var count: Int64
        var last: PackID?
        /// The index generation (packs ever added), to tell a removal among packs added
        /// later: then the count grew by less than the generation.
        var generation: Int64 = 0
    }

    func packState() throws -> PackState {
        try exclusive { try currentPackState() }
    }

    private func currentPackState() throws -> PackState {
        let s = try db.prepare("SELECT coalesce(max(n), 0), count(*) FROM packs")
        _ = try s.step()
        let upTo = s.int(0)
        return PackState(upTo: upTo, count: s.int(1), last: try packID(at: upTo), generation: try generation())
    }

    private func packID(at n: Int64) throws -> PackID? {
        let s = try db.prepare("SELECT id FROM packs WHERE n = ?1")
        s.bind(1, n)
        return try s.step() ? s.id(0) : nil
    }

    /// Whether every pack of `state` is still indexed. Called with `lock` held.
    private func stillHolds(_ state: PackState) throws -> Bool {
        let s = try db.prepare("SELECT count(*) FROM packs WHERE n <= ?1")
        s.bind(1, state.upTo)
        _ = try s.step()
        guard s.int(0) == state.count else { return false }
        return try packID(at: state.upTo) == state.last
    }

    /// Records that every blob `snapshot` names is indexed now, given that it was written
    /// by a run that began at `start`: every blob it found indexed was in a pack indexed
    /// then or added since, and everything it stored is indexed by now. Nothing is
    /// recorded if any pack was removed meanwhile (one of `start`'s, or one added since:
    /// the count then grew by less than the generation).
    func markComplete(_ snapshot: SnapshotID, since start: PackState) throws {
        try exclusive { () throws in
            let now = try currentPackState()
            guard try stillHolds(start), now.count - start.count == now.generation - start.generation else { return }
            let s = try db.prepare("INSERT OR REPLACE INTO complete VALUES(?1, ?2, ?3, ?4)")
            s.bind(1, snapshot)
            s.bind(2, now.upTo)
            s.bind(3, now.count)
            if let last = now.last { s.bind(4, last) } else { s.bindNull(4) }
            try s.run()
        }
    }

    /// Whether every blob `snapshot` names is still indexed, known without looking them up:
    /// it was complete when recorded and no pack indexed then has been removed since.
    func isComplete(_ snapshot: SnapshotID) throws -> Bool {
        try exclusive { () throws -> Bool in
            let s = try db.prepare("SELECT packs_upto, pack_count, last_pack FROM complete WHERE snapshot = ?1")
            s.bind(1, snapshot)
            guard try s.step() else { return false }
            let state = PackState(upTo: s.int(0), count: s.int(1), last: s.isNull(2) ? nil : s.id(2))
            return try stillHolds(state)
        }
    }

    // MARK: The absent-id filter

    // Kept in step with the blob rows by the generation in `meta`, which every addPack
    // advances in its transaction. The filter records the generation it describes; it is
    // trusted (loaded from its file, or kept in memory) only while that equals the
    // database's: a crash before the filter is saved, or another process adding packs,
    // makes them differ, and the filter is then rebuilt from the rows (on load) or set
    // aside (in memory, for the rest of this connection). Removing packs leaves their
    // bits set, which can only cost a SQLite lookup. The `instance` (random, made with
    // the database) keeps a filter from matching a recreated index.

    /// The filter for "is it stored?" questions: loaded from its file, or built from the
    /// blob rows on first use (and saved); `nil` once set aside. Called with `lock` held.
    private func dedupFilter() throws -> IDFilter? {
        switch filterState {
        case .clean, .dirty: return filter
        case .disabled: return nil
        case .unloaded: break
        }
        try beginRead()
        defer { finishRead() }
        let (instance, generation) = try filterVersion()
        let saved = adoptSavedFilter(instance: instance, generation: generation)
        let buildTable = try loadTable(instance: instance)
        if let saved, !buildTable { return saved }
        // One scan (in id order: the table's key order, no sort) feeds whichever is built.
        var built: IDFilter?
        if saved == nil {
            let count = try idCount(after: 0)
            built = IDFilter(capacity: Int(count) + Int(count) / 2, instance: instance, generation: generation)
        }
        // Derived data: when the table cannot be written (a full disk), lookups use SQLite.
        var writer =
            buildTable ? try? IDTable.Writer(path: tablePath, instance: instance, state: currentPackState()) : nil
        let s = try db.prepare("SELECT id FROM blobs ORDER BY id")
        while try s.step() {
            guard let id = s.id(0) else { continue }
            built?.insert(id)
            if let w = writer, (try? w.append(id)) == nil { writer = nil }
        }
        if let writer, let written = try? writer.finish() {
            table = written
            tableTrustedIn = readTransaction
        }
        guard let built else { return saved }
        filter = built
        filterState = .dirty
        saveFilter()
        return built
    }

    // MARK: The sorted id table

    // An IDTable lists the ids of the packs indexed at the state in its header. Pack
    // numbers are never given twice, so while `stillHolds` that state, every one of those
    // packs is indexed and every id listed is stored; ids indexed later are not listed and
    // go to SQLite. It is rebuilt (with the filter's scan when both are due) when a
    // connection first asks and it is missing, invalid, or lists less than four fifths of
    // the ids: a rebuild reads every row, so its cost is spread over many new ids.

    /// Loads the saved table if needed and tells whether a new one should be built now.
    /// Called with `lock` held, inside a read transaction.
    private func loadTable(instance: ObjectID) throws -> Bool {
        if table == nil { table = IDTable.load(path: tablePath, instance: instance) }
        guard let table = try trustedTable() else { return try idCount(after: 0) >= tableMinimum }
        let unlisted = try idCount(after: table.state.upTo)
        return unlisted > 0 && unlisted >= Int64(table.count / 4) && Int64(table.count) + unlisted >= tableMinimum
    }

    /// The blobs of the packs numbered above `n` (all of them for 0), from the per-pack
    /// counts: a blob held by two packs counts twice.
    private func idCount(after n: Int64) throws -> Int64 {
        let s = try db.prepare("SELECT coalesce(sum(blob_count), 0) FROM packs WHERE n > ?1")
        s.bind(1, n)
        _ = try s.step()
        return s.int(0)
    }

    /// How many ids the loaded id table lists (`nil`: none loaded), for tests.
    var idTableCount: Int? { lock.locked { table?.count } }

    /// The id table, when it may answer "stored" in the current read transaction: none of
    /// the packs it lists has been removed (checked once per transaction; once not, the
    /// table is dropped for good, since pack numbers never come back). Called with `lock`
    /// held, inside a read transaction.
    private func trustedTable() throws -> IDTable? {
        guard let table else { return nil }
        if tableTrustedIn == readTransaction { return table }
        guard try stillHolds(table.state) else {
            self.table = nil
            return nil
        }
        tableTrustedIn = readTransaction
        return table
    }

    /// Loads the saved filter if it matches the database; never builds one. Called with
    /// `lock` held and no transaction open.
    private func loadSavedFilter() {
        guard let (instance, generation) = try? filterVersion() else { return }
        _ = adoptSavedFilter(instance: instance, generation: generation)
    }

    /// Takes the saved filter as this connection's if it describes `instance` at
    /// `generation`. Called with `lock` held.
    private func adoptSavedFilter(instance: ObjectID, generation: Int64) -> IDFilter? {
        guard let saved = IDFilter.load(path: filterPath, instance: instance, generation: generation) else {
            return nil
        }
        filter = saved
        filterState = .clean
        return saved
    }

    /// Stops using the filter for the rest of this connection (lookups go to SQLite), and
    /// never saves it. Called with `lock` held.
    private func setFilterAside() {
        filter = nil
        filterState = .disabled
    }

    /// After a pack committed at `before` + 1: adds its ids, or sets the filter aside when
    /// another connection added packs since the filter was made. Called with `lock` held.
    private func filterAdded(_ entries: [PackEntry], before: Int64) {
        guard let filter else { return }
        guard filter.generation == before else { return setFilterAside() }
        for e in entries { filter.insert(e.id) }
        filter.generation = before + 1
        filterState = .dirty
        if filter.inserted > filter.capacity {
            // Full: rebuilt at its next use, sized for the rows then.
            self.filter = nil
            filterState = .unloaded
        }
    }

    /// Saves a changed filter if it still describes the database. Called with `lock` held.
    private func saveFilter() {
        guard filterState == .dirty, let filter else { return }
        guard (try? generation()) == filter.generation else { return setFilterAside() }
        // Derived data: when it cannot be saved, the next process rebuilds it.
        if (try? filter.save(to: filterPath)) != nil { filterState = .clean }
    }

    private func filterVersion() throws -> (instance: ObjectID, generation: Int64) {
        guard let instance = ObjectID(hex: try metaValue("instance")) else {
            throw CABackupError.index("the index has no instance id; delete \(db.path) to rebuild it")
        }
        return (instance, try generation())
    }

    private func generation() throws -> Int64 {
        guard let g = Int64(try metaValue("generation")) else {
            throw CABackupError.index("the index has no generation; delete \(db.path) to rebuild it")
        }
        return g
    }

    private func metaValue(_ key: String) throws -> String {
        let s = try db.prepare("SELECT value FROM meta WHERE key = ?1")
        s.bind(1, key)
        return try s.step() ? s.text(0) : ""
    }

    private func queryInt(_ sql: String) throws -> Int64 {
        // SQL-safe: callers pass literals of this file.
        let s = try db.prepare(sql)
        _ = try s.step()
        return s.int(0)
    }

    /// Forgets packs and their blobs, all in one transaction. There is no index of blobs
    /// by pack (it was two fifths of the file and of every insert's work), so the blobs
    /// are found in one scan of the table: callers remove all the packs they drop at once.
    func removePacks(_ ids: some Collection<PackID>) throws {
        guard !ids.isEmpty else { return }
        try exclusive { () throws in
            try db.execute("BEGIN IMMEDIATE")
            do {
                let s = try db.prepare("SELECT n FROM packs WHERE id = ?1")
                var numbers = Set<Int64>()  // a set: an id named twice must not count twice
                for id in ids {
                    s.reset()
                    s.bind(1, id)
                    if try s.step() { numbers.insert(s.int(0)) }
                }
                if try !numbers.isEmpty && Int64(numbers.count) == queryInt("SELECT count(*) FROM packs") {
                    // Every pack (a rebuild): SQLite empties whole tables without a row walk.
                    try db.execute("DELETE FROM blobs; DELETE FROM packs")
                } else if !numbers.isEmpty {
                    let list = numbers.map { String($0) }.joined(separator: ",")
                    // SQL-safe: list is pack numbers (Int64) read from the index itself.
                    try db.execute("DELETE FROM blobs WHERE pack IN (\(list)); DELETE FROM packs WHERE n IN (\(list))")
                }
                try db.execute("COMMIT")
            } catch {
                try? db.execute("ROLLBACK")
                throw error
            }
        }
    }

    /// The ids of the blobs the index places in a pack (a scan of the table).
    func blobIDs(inPack pack: PackID) throws -> [BlobID] {
        try exclusive { () throws -> [BlobID] in
            let s = try db.prepare("SELECT id FROM blobs WHERE pack = (SELECT n FROM packs WHERE id = ?1)")
            s.bind(1, pack)
            var out: [BlobID] = []
            while try s.step() { if let id = s.id(0) { out.append(id) } }
            return out
        }
    }

    /// The indexed packs holding blobs of a type, with their sizes (a scan of the table).
    func packsHolding(_ type: BlobType) throws -> [(PackID, Int64)] {
        try exclusive { () throws -> [(PackID, Int64)] in
            let s = try db.prepare(
                "SELECT p.id, p.size FROM packs p WHERE p.n IN (SELECT DISTINCT pack FROM blobs WHERE type = ?1)")
            s.bind(1, Int64(type.rawValue))
            var out: [(PackID, Int64)] = []
            while try s.step() { if let id = s.id(0) { out.append((id, s.int(1))) } }
            return out
        }
    }

    /// Every indexed pack id.
    func packIDs() throws -> Set<PackID> {
        try exclusive { () throws in
            let s = try db.prepare("SELECT id FROM packs")
            var out = Set<PackID>()
            while try s.step() { if let id = s.id(0) { out.insert(id) } }
            return out
        }
    }

    /// Records a snapshot (its stored record bytes).
    func addSnapshot(_ id: SnapshotID, timeNs: Int64, record: [UInt8]) throws {
        try exclusive { () throws in
            let s = try db.prepare("INSERT OR REPLACE INTO snapshots VALUES(?1, ?2, ?3)")
            s.bind(1, id)
            s.bind(2, timeNs)
            s.bind(3, bytes: record)
            try s.run()
        }
    }

    func removeSnapshot(_ id: SnapshotID) throws {
        try exclusive { () throws in
            for table in ["snapshots WHERE id", "complete WHERE snapshot"] {
                // SQL-safe: table is one of the two literals above.
                let s = try db.prepare("DELETE FROM \(table) = ?1")
                s.bind(1, id)
                try s.run()
            }
        }
    }

    /// Records a forget record: the snapshot ids it says were removed with the key.
    func addForget(_ id: SnapshotID, forgotten: [SnapshotID]) throws {
        try exclusive { () throws in
            let s = try db.prepare("INSERT OR REPLACE INTO forgets VALUES(?1, ?2)")
            s.bind(1, id)
            s.bind(2, bytes: forgotten.flatMap { $0.withUnsafeBytes { Array($0) } })
            try s.run()
        }
    }

    func removeForget(_ id: SnapshotID) throws {
        try exclusive { () throws in
            let s = try db.prepare("DELETE FROM forgets WHERE id = ?1")
            s.bind(1, id)
            try s.run()
        }
    }

    /// The ids of the forget records indexed.
    func forgetIDs() throws -> Set<SnapshotID> {
        try exclusive { () throws in
            let s = try db.prepare("SELECT id FROM forgets")
            var out = Set<SnapshotID>()
            while try s.step() { if let id = s.id(0) { out.insert(id) } }
            return out
        }
    }

    /// Whether an indexed forget record names `id`.
    func wasForgotten(_ id: SnapshotID) throws -> Bool {
        try exclusive { () throws in
            let s = try db.prepare("SELECT forgotten FROM forgets")
            while try s.step() {
                let found = s.bytes(0).withUnsafeBytes { raw in
                    stride(from: 0, to: raw.count - 31, by: 32).contains {
                        ObjectID(UnsafeRawBufferPointer(rebasing: raw[$0..<($0 + 32)])) == id
                    }
                }
                if found { return true }
            }
            return false
        }
    }

    /// The newest snapshot indexed, with its time.
    func newestSnapshot() throws -> (id: SnapshotID, timeNs: Int64)? {
        try exclusive { () throws in
            let s = try db.prepare("SELECT id, time_ns FROM snapshots ORDER BY time_ns DESC, id DESC LIMIT 1")
            guard try s.step(), let id = s.id(0) else { return nil }
            return (id, s.int(1))
        }
    }

    /// Whether a snapshot is indexed.
    func hasSnapshot(_ id: SnapshotID) throws -> Bool {
        try exclusive { () throws in
            let s = try db.prepare("SELECT 1 FROM snapshots WHERE id = ?1")
            return try s.hasRow(binding: id)
        }
    }

    /// All snapshot records, oldest first.
    func snapshotRecords() throws -> [(id: SnapshotID, record: [UInt8])] {
        try exclusive { () throws in
            let s = try db.prepare("SELECT id, record FROM snapshots ORDER BY time_ns, id")
            var out: [(SnapshotID, [UInt8])] = []
            while try s.step() {
                guard let id = s.id(0) else { continue }
                out.append((id, s.bytes(1)))
            }
            return out
        }
    }

    /// Every blob row, sorted, for comparing two indexes (tests, `repair index`).
    func allBlobRows() throws -> [String] {
        try exclusive { () throws in
            let s = try db.prepare(
                """
                SELECT hex(b.id), hex(p.id), b.type, b.compression, b.offset, b.length, b.raw_length
                FROM blobs b JOIN packs p ON p.n = b.pack ORDER BY 1, 2
                """)
            var out: [String] = []
            while try s.step() {
                out.append((0..<7).map { s.text(Int32($0)) }.joined(separator: " "))
            }
            return out
        }
    }

    /// Counts of packs, blobs and snapshots.
    func counts() throws -> (packs: Int, blobs: Int, snapshots: Int) {
        try exclusive { () throws in
            func count(_ table: String) throws -> Int {
                // SQL-safe: table is a literal name passed by the caller below.
                let s = try db.prepare("SELECT count(*) FROM \(table)")
                _ = try s.step()
                return Int(s.int(0))
            }
            return (try count("packs"), try count("blobs"), try count("snapshots"))
        }
    }
}
