import CSQLite

/// The SQLite C API, wrapped as small as it can be: a connection and prepared statements.
package final class SQLiteDatabase {
    // Safe: used under the owning Index's lock only.
    package let handle: OpaquePointer
    package let path: String

    package init(path: String) throws {
        var db: OpaquePointer?
        let flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &db, flags, nil)
        guard rc == SQLITE_OK, let db else {
            let msg = db.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close(db)
            throw CABackupError.index("cannot open \(path): \(msg)")
        }
        handle = db
        self.path = path
        sqlite3_busy_timeout(db, 60_000)
    }

    deinit { sqlite3_close_v2(handle) }

    var lastError: String { String(cString: sqlite3_errmsg(handle)) }

    /// Rows the last INSERT, UPDATE or DELETE changed.
    package var changes: Int { Int(sqlite3_changes(handle)) }

    package func execute(_ sql: String) throws {
        var err: UnsafeMutablePointer<CChar>?
        if sqlite3_exec(handle, sql, nil, nil, &err) != SQLITE_OK {
            let msg = err.map { String(cString: $0) } ?? lastError
            sqlite3_free(err)
            throw CABackupError.index(msg)
        }
    }

    package func prepare(_ sql: String) throws -> SQLiteStatement {
        var stmt: OpaquePointer?
        guard sqlite3_prepare_v3(handle, sql, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &stmt, nil) == SQLITE_OK,
            let stmt
        else { throw CABackupError.index("prepare failed: \(lastError)") }
        return SQLiteStatement(stmt, db: self)
    }
}

/// A prepared statement, reset before each use.
package final class SQLiteStatement {
    let stmt: OpaquePointer
    unowned let db: SQLiteDatabase

    init(_ stmt: OpaquePointer, db: SQLiteDatabase) {
        self.stmt = stmt
        self.db = db
    }

    deinit { sqlite3_finalize(stmt) }

    /// Clears bindings and state for a new execution.
    package func reset() {
        sqlite3_reset(stmt)
        sqlite3_clear_bindings(stmt)
    }

    package func bind(_ i: Int32, _ v: Int64) { sqlite3_bind_int64(stmt, i, v) }
    package func bind(_ i: Int32, _ v: Int) { sqlite3_bind_int64(stmt, i, Int64(v)) }
    package func bind(_ i: Int32, _ v: String) {
        // SQLITE_TRANSIENT: SQLite copies the text before the call returns.
        sqlite3_bind_text(stmt, i, v, -1, unsafeBitCast(-1, to: sqlite3_destructor_type.self))
    }
    package func bindNull(_ i: Int32) { sqlite3_bind_null(stmt, i) }
    package func bind(_ i: Int32, _ id: ObjectID) {
        id.withUnsafeBytes { raw in
            _ = sqlite3_bind_blob(stmt, i, raw.baseAddress, 32, unsafeBitCast(-1, to: sqlite3_destructor_type.self))
        }
    }

    /// Binds `id` to parameter `i` without a copy, steps once and resets: whether the
    /// statement returns a row (an existence query, the index's hot path).
    package func hasRow(binding id: ObjectID, at i: Int32 = 1) throws -> Bool {
        try id.withUnsafeBytes { raw in
            sqlite3_bind_blob(stmt, i, raw.baseAddress, 32, nil)  // SQLITE_STATIC: valid until reset
            defer { sqlite3_reset(stmt) }
            return try step()
        }
    }

    /// Steps once; `true` when a row is available.
    package func step() throws -> Bool {
        switch sqlite3_step(stmt) {
        case SQLITE_ROW: return true
        case SQLITE_DONE: return false
        default: throw CABackupError.index(db.lastError)
        }
    }

    /// Runs a statement that returns no rows.
    package func run() throws {
        defer { sqlite3_reset(stmt) }
        _ = try step()
    }

    package func int(_ col: Int32) -> Int64 { sqlite3_column_int64(stmt, col) }
    package func isNull(_ col: Int32) -> Bool { sqlite3_column_type(stmt, col) == SQLITE_NULL }
    package func text(_ col: Int32) -> String {
        guard let p = sqlite3_column_text(stmt, col) else { return "" }
        return String(cString: p)
    }
    package func id(_ col: Int32) -> ObjectID? {
        guard sqlite3_column_bytes(stmt, col) == 32, let p = sqlite3_column_blob(stmt, col) else { return nil }
        return ObjectID(UnsafeRawBufferPointer(start: p, count: 32))
    }
}

extension SQLiteStatement {
    package func bytes(_ col: Int32) -> [UInt8] {
        let n = Int(sqlite3_column_bytes(stmt, col))
        guard n > 0, let p = sqlite3_column_blob(stmt, col) else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: n))
    }

    /// Binds a byte array (SQLite copies it).
    package func bind(_ i: Int32, bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            _ = sqlite3_bind_blob(
                stmt, i, raw.baseAddress, Int32(raw.count), unsafeBitCast(-1, to: sqlite3_destructor_type.self))
        }
    }
}
