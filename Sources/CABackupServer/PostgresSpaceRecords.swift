import CABackup
import NIOCore
import PostgresNIO

/// The records of one space in a PostgreSQL database shared by several server instances:
/// the blob index, the bytes stored and promised to uploads, the config claim and the
/// leases of the repository lock. Every space's rows are in the same tables, keyed by the
/// space's name; one instance of this class speaks for one space.
///
/// Behaves as ``SQLiteSpaceRecords`` does, with every check-then-write one statement or
/// one transaction that holds the space's `space_usage` row (`SELECT … FOR UPDATE`, the
/// space's mutex among instances): uploads of all instances together never pass the
/// quota, one config is stored, and an exclusive lease is held alone.
///
/// Times (reservation and lease expiry) are read from the database's clock, never the
/// instance's: instances whose clocks disagree still agree on when a lease lapsed.
///
/// A reservation whose upload never settled it (an instance that crashed, or lost the
/// database while releasing it) lapses `reservationLifetime` after its upload last
/// extended it (uploads do about once a minute), and its bytes count no longer.
final class PostgresSpaceRecords: SpaceRecords {
    private let db: PostgresDatabase
    private let space: String
    private let reservationLifetimeNs: Int64
    private let leaseLifetimeNs: Int64
    private let configClaimLifetimeNs: Int64

    /// The tables, created by ``PostgresDatabase/migrate()``.
    static let schema = [
        """
        CREATE TABLE IF NOT EXISTS space_packs(space text NOT NULL, pack bytea NOT NULL, size bigint NOT NULL,
            PRIMARY KEY(space, pack))
        """,
        """
        CREATE TABLE IF NOT EXISTS space_blobs(space text NOT NULL, blob bytea NOT NULL, pack bytea NOT NULL,
            PRIMARY KEY(space, blob, pack))
        """,
        "CREATE INDEX IF NOT EXISTS space_blobs_by_pack ON space_blobs(space, pack)",
        """
        CREATE TABLE IF NOT EXISTS space_usage(space text PRIMARY KEY, used_bytes bigint NOT NULL DEFAULT 0,
            config_claimed boolean NOT NULL DEFAULT false)
        """,
        """
        CREATE TABLE IF NOT EXISTS space_reservations(id text PRIMARY KEY, space text NOT NULL,
            bytes bigint NOT NULL, expires_ns bigint NOT NULL)
        """,
        "CREATE INDEX IF NOT EXISTS space_reservations_by_space ON space_reservations(space, expires_ns)",
        """
        CREATE TABLE IF NOT EXISTS space_leases(id text PRIMARY KEY, space text NOT NULL,
            exclusive boolean NOT NULL, expires_ns bigint NOT NULL, idempotency_key text NULL)
        """,
        "CREATE INDEX IF NOT EXISTS space_leases_by_space ON space_leases(space, expires_ns)",
    ]

    /// The claim time of a config stored: never taken over.
    private static let storedClaim = Int64.max

    /// The database's clock, in nanoseconds since 1970, as the statement runs.
    private static let now = "(extract(epoch FROM clock_timestamp()) * 1000000000)::bigint"

    /// The records of `space` in `db`, whose schema ``PostgresDatabase/migrate()`` has
    /// made. An upload's reservation lapses `reservationLifetime` after it was last
    /// extended; a config claim can be taken over after `configClaimLifetime`.
    init(
        _ db: PostgresDatabase, space: String, reservationLifetime: Duration = .seconds(15 * 60),
        configClaimLifetime: Duration = .seconds(120), leaseLifetime: Duration = defaultLeaseLifetime
    ) {
        self.db = db
        self.space = space
        leaseLifetimeNs = nanoseconds(leaseLifetime)
        reservationLifetimeNs = nanoseconds(reservationLifetime)
        configClaimLifetimeNs = nanoseconds(configClaimLifetime)
    }

    func missing(_ ids: [BlobID]) async throws -> [BlobID] {
        if ids.isEmpty { return [] }
        return try await db.query(
            """
            SELECT q.id FROM unnest(\(Self.buffers(ids))::bytea[]) WITH ORDINALITY AS q(id, n)
            WHERE NOT EXISTS (SELECT 1 FROM space_blobs b WHERE b.space = \(space) AND b.blob = q.id)
            ORDER BY q.n
            """
        ).map { try Self.id($0.decode(ByteBuffer.self)) }
    }

    func reserve(_ bytes: Int64, quota: Int64?) async throws -> Reservation {
        let (space, lifetime) = (space, reservationLifetimeNs)
        let id = hexString(secureRandomBytes(16))
        try await db.transaction { c in
            let used = try await Self.lockUsage(c, space)
            // SQL-safe: now is a literal.
            try await c.rows(
                "DELETE FROM space_reservations WHERE space = \(space) AND expires_ns <= \(unescaped: Self.now)")
            let reserved =
                try await c.rows(
                    "SELECT coalesce(sum(bytes), 0)::bigint FROM space_reservations WHERE space = \(space)"
                ).first?.decode(Int64.self) ?? 0
            if let quota, used + reserved + bytes > quota {
                throw APIError.quotaExceeded(used: used, quota: quota, promised: reserved, asked: bytes)
            }
            // SQL-safe: now is a literal.
            try await c.rows(
                """
                INSERT INTO space_reservations(id, space, bytes, expires_ns)
                VALUES (\(id), \(space), \(bytes), \(unescaped: Self.now) + \(lifetime))
                """)
        }
        return Reservation(id: id, bytes: bytes)
    }

    func extend(_ reservation: Reservation) async {
        if reservation.settled.load(ordering: .acquiring) { return }
        // SQL-safe: now is a literal.
        _ = try? await db.query(
            """
            UPDATE space_reservations SET expires_ns = \(unescaped: Self.now) + \(reservationLifetimeNs)
            WHERE id = \(reservation.id)
            """)
    }

    /// Never fails: when the database cannot be reached, the reservation lapses by itself.
    func release(_ reservation: Reservation) async {
        guard reservation.settle() else { return }
        _ = try? await db.query("DELETE FROM space_reservations WHERE id = \(reservation.id)")
    }

    func stored(_ kind: FileKind, _ name: String, size: Int64, blobs: [BlobID], reservation: Reservation) async throws {
        let space = space
        try await db.transaction { c in
            _ = try await Self.lockUsage(c, space)
            // A pack counts once: stored again (a retry after an answer lost, on this or
            // another instance) it is only indexed, in case the first store was not.
            var new = true
            if kind == .pack, let pack = ObjectID(hex: name) {
                new = try await !c.rows(
                    """
                    INSERT INTO space_packs(space, pack, size) VALUES (\(space), \(ByteBuffer(bytes: pack.bytes)), \(size))
                    ON CONFLICT DO NOTHING RETURNING 1
                    """
                ).isEmpty
                try await Self.index(c, space, [(pack, size, blobs)])
            }
            if new { try await Self.addUsed(c, space, size) }
            if kind == .config {  // stored: the claim is no longer one to take over
                try await c.rows(
                    "UPDATE space_usage SET config_claimed_ns = \(Self.storedClaim) WHERE space = \(space)")
            }
            try await c.rows("DELETE FROM space_reservations WHERE id = \(reservation.id)")
        }
        _ = reservation.settle()
    }

    func removed(_ kind: FileKind, _ name: String, size: Int64) async throws {
        let space = space
        try await db.transaction { c in
            _ = try await Self.lockUsage(c, space)
            // A pack's bytes leave with its row, once: never counted twice off by two
            // removals, nor off for a pack whose bytes were never counted.
            var freed = size
            if kind == .pack, let pack = ObjectID(hex: name) {
                freed =
                    try await c.rows(
                        """
                        DELETE FROM space_packs WHERE space = \(space) AND pack = \(ByteBuffer(bytes: pack.bytes))
                        RETURNING size
                        """
                    ).first?.decode(Int64.self) ?? 0
                try await Self.unindex(c, space, [pack])
            }
            try await Self.addUsed(c, space, -freed, unclaimingConfig: kind == .config)
        }
    }

    /// A claim older than `configClaimLifetime` is taken over: its instance died between
    /// claiming and storing the config (the caller then finds whether a config is stored).
    func claimConfig() async throws -> Bool {
        // One statement: of two instances claiming at once, the second waits for the
        // first's row and then finds it claimed.
        // SQL-safe: now is a literal.
        try await !db.query(
            """
            INSERT INTO space_usage(space, used_bytes, config_claimed, config_claimed_ns)
            VALUES (\(space), 0, true, \(unescaped: Self.now))
            ON CONFLICT (space) DO UPDATE SET config_claimed = true, config_claimed_ns = \(unescaped: Self.now)
            WHERE NOT space_usage.config_claimed
                OR space_usage.config_claimed_ns < \(unescaped: Self.now) - \(configClaimLifetimeNs)
            RETURNING 1
            """
        ).isEmpty
    }

    func unclaimConfig() async throws {
        try await db.query("UPDATE space_usage SET config_claimed = false WHERE space = \(space)")
    }

    func acquire(exclusive: Bool, key: String?) async throws -> String? {
        let space = space
        return try await db.transaction { c -> String? in
            _ = try await Self.lockUsage(c, space)
            // SQL-safe: now is a literal.
            try await c.rows(
                "DELETE FROM space_leases WHERE space = \(space) AND expires_ns <= \(unescaped: Self.now)")
            if let key,
                let held = try await c.rows(
                    """
                    SELECT id FROM space_leases
                    WHERE space = \(space) AND idempotency_key = \(key) AND exclusive = \(exclusive) LIMIT 1
                    """
                ).first
            {
                return try held.decode(String.self)
            }
            let conflicts = try await c.rows(
                "SELECT 1 FROM space_leases WHERE space = \(space) AND (exclusive OR \(exclusive)) LIMIT 1")
            if !conflicts.isEmpty { return nil }
            let id = hexString(secureRandomBytes(16))
            // SQL-safe: now is a literal.
            try await c.rows(
                """
                INSERT INTO space_leases(id, space, exclusive, expires_ns, idempotency_key)
                VALUES (\(id), \(space), \(exclusive), \(unescaped: Self.now) + \(leaseLifetimeNs), \(key))
                """)
            return id
        }
    }

    func renew(_ id: String) async throws -> Bool {
        // SQL-safe: now is a literal.
        try await !db.query(
            """
            UPDATE space_leases SET expires_ns = \(unescaped: Self.now) + \(leaseLifetimeNs)
            WHERE id = \(id) AND space = \(space) AND expires_ns > \(unescaped: Self.now) RETURNING 1
            """
        ).isEmpty
    }

    func releaseLease(_ id: String) async throws -> Bool {
        try await !db.query("DELETE FROM space_leases WHERE id = \(id) AND space = \(space) RETURNING 1").isEmpty
    }

    func indexedPacks() async throws -> Set<String> {
        Set(
            try await db.query("SELECT pack FROM space_packs WHERE space = \(space)").map {
                try Self.id($0.decode(ByteBuffer.self)).hex
            })
    }

    func reconcile(
        add: [(name: String, size: Int64, blobs: [BlobID])], drop: Set<String>, usedBytes: Int64?, hasConfig: Bool?
    ) async throws {
        let space = space
        let found = ReconcileFound(add: add, drop: drop, usedBytes: usedBytes, hasConfig: hasConfig)
        try await db.transaction { c in
            _ = try await Self.lockUsage(c, space)
            try await Self.apply(found, c, space)
        }
    }

    func reconcile(holding scan: @Sendable (Set<String>) async throws -> ReconcileFound) async throws -> Int64 {
        let space = space
        return try await db.transaction { c in
            let before = try await Self.lockUsage(c, space)
            let indexed = try await c.rows("SELECT pack FROM space_packs WHERE space = \(space)").map {
                try Self.id($0.decode(ByteBuffer.self)).hex
            }
            try await Self.apply(try await scan(Set(indexed)), c, space)
            return before
        }
    }

    func usage() async throws -> (used: Int64, reserved: Int64) {
        // SQL-safe: now is a literal.
        let row = try await db.query(
            """
            SELECT coalesce((SELECT used_bytes FROM space_usage WHERE space = \(space)), 0),
                coalesce((SELECT sum(bytes) FROM space_reservations
                    WHERE space = \(space) AND expires_ns > \(unescaped: Self.now)), 0)::bigint
            """)
        guard let r = row.first else { return (0, 0) }
        let (used, reserved) = try r.decode((Int64, Int64).self)
        return (used, reserved)
    }

    var shared: Bool { true }

    /// Forgets every record of `space` (its account was deleted): a new account of the same
    /// name must not find an index claiming blobs its space does not hold.
    static func forget(space: String, in db: PostgresDatabase) async throws {
        try await db.transaction { c in
            // SQL-safe: table is one of the literals below; the space is bound.
            for table in ["space_leases", "space_reservations", "space_blobs", "space_packs", "space_usage"] {
                try await c.rows("DELETE FROM \(unescaped: table) WHERE space = \(space)")
            }
        }
    }

    // MARK: Helpers (in a transaction)

    /// Makes the space's usage row if it has none, locks it until the commit (instances
    /// changing the space's usage or leases meanwhile wait), and returns the bytes stored.
    private static func lockUsage(_ c: PostgresConnection, _ space: String) async throws -> Int64 {
        try await c.rows("INSERT INTO space_usage(space) VALUES (\(space)) ON CONFLICT (space) DO NOTHING")
        return try await c.rows("SELECT used_bytes FROM space_usage WHERE space = \(space) FOR UPDATE")
            .first?.decode(Int64.self) ?? 0
    }

    /// Applies a reconciliation pass's findings, the usage row locked.
    private static func apply(_ found: ReconcileFound, _ c: PostgresConnection, _ space: String) async throws {
        let packs: [(id: ObjectID, size: Int64, blobs: [BlobID])] = found.add.compactMap { p in
            ObjectID(hex: p.name).map { ($0, p.size, p.blobs) }
        }
        try await c.rows(
            """
            UPDATE space_usage SET used_bytes = coalesce(\(found.usedBytes), used_bytes),
                config_claimed = coalesce(\(found.hasConfig), config_claimed),
                config_claimed_ns = CASE WHEN \(found.hasConfig) THEN \(Self.storedClaim) ELSE config_claimed_ns END
            WHERE space = \(space)
            """)
        // SQL-safe: now is a literal.
        try await c.rows(
            "DELETE FROM space_reservations WHERE space = \(space) AND expires_ns <= \(unescaped: Self.now)")
        if found.usedBytes == nil, !packs.isEmpty {
            // Adding only: the packs this pass indexes first count their bytes here (a
            // later record of the same pack finds its row and adds nothing).
            let added = try await c.rows(
                """
                INSERT INTO space_packs(space, pack, size)
                SELECT \(space), p, s FROM unnest(\(Self.buffers(packs.map(\.id)))::bytea[], \(packs.map(\.size))::bigint[]) AS q(p, s)
                ON CONFLICT DO NOTHING RETURNING size
                """
            ).reduce(Int64(0)) { try $0 + $1.decode(Int64.self) }
            try await Self.addUsed(c, space, added)
        }
        try await Self.index(c, space, packs)
        try await Self.unindex(c, space, found.drop.compactMap { ObjectID(hex: $0) })
    }

    /// Adds `bytes` to the bytes stored (subtracts, when negative), and gives up the config
    /// claim when `unclaimingConfig`. Locks the usage row first, as every transaction here
    /// does, so that two never wait for each other.
    private static func addUsed(
        _ c: PostgresConnection, _ space: String, _ bytes: Int64, unclaimingConfig: Bool = false
    ) async throws {
        try await c.rows(
            """
            INSERT INTO space_usage(space, used_bytes) VALUES (\(space), \(bytes))
            ON CONFLICT (space) DO UPDATE SET used_bytes = space_usage.used_bytes + excluded.used_bytes,
                config_claimed = space_usage.config_claimed AND NOT \(unclaimingConfig)
            """)
    }

    /// Indexes `packs` and their blob ids: two statements, however many.
    private static func index(
        _ c: PostgresConnection, _ space: String, _ packs: [(id: ObjectID, size: Int64, blobs: [BlobID])]
    ) async throws {
        if packs.isEmpty { return }
        try await c.rows(
            """
            INSERT INTO space_packs(space, pack, size)
            SELECT \(space), p, s FROM unnest(\(buffers(packs.map(\.id)))::bytea[], \(packs.map(\.size))::bigint[]) AS q(p, s)
            ON CONFLICT DO NOTHING
            """)
        let blobs = packs.flatMap { p in p.blobs.map { ($0, p.id) } }
        if blobs.isEmpty { return }
        try await c.rows(
            """
            INSERT INTO space_blobs(space, blob, pack)
            SELECT \(space), b, p FROM unnest(\(buffers(blobs.map(\.0)))::bytea[], \(buffers(blobs.map(\.1)))::bytea[]) AS q(b, p)
            ON CONFLICT DO NOTHING
            """)
    }

    /// Drops `packs` and their blob ids from the index.
    private static func unindex(_ c: PostgresConnection, _ space: String, _ packs: [ObjectID]) async throws {
        if packs.isEmpty { return }
        let ids = buffers(packs)
        try await c.rows("DELETE FROM space_blobs WHERE space = \(space) AND pack = ANY(\(ids)::bytea[])")
        try await c.rows("DELETE FROM space_packs WHERE space = \(space) AND pack = ANY(\(ids)::bytea[])")
    }

    private static func buffers(_ ids: [ObjectID]) -> [ByteBuffer] { ids.map { ByteBuffer(bytes: $0.bytes) } }

    private static func id(_ buffer: ByteBuffer) throws -> ObjectID {
        guard let id = ObjectID(bytes: Array(buffer.readableBytesView)) else {
            throw CABackupError.corrupt(what: "the space index", reason: "an id is \(buffer.readableBytes) bytes")
        }
        return id
    }
}
