import CABackup
import Foundation
import NIOPosix
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// One user's private data space: its files (config, key slots, packs, snapshot records)
/// in a ``Storage`` — a repository directory in the same layout as a local one
/// (`DIR/spaces/NAME/`) for a single server — and its ``SpaceRecords``: the server's own
/// index of which keyed blob ids each pack holds, the bytes used (for the quota) and the
/// leases of the repository lock. The server never holds a key: it reads only the clear
/// part of pack headers (ids and stored lengths).
///
/// Storage calls block (a disk, or an object store over the network), so they run on the
/// server's I/O threads, never on the threads that serve connections.
final class Space: Sendable {
    let user: String
    let storage: any Storage
    let records: any SpaceRecords
    /// Where uploads are received before they are stored: this instance's own disk.
    let uploadDirectory: String
    private let io: NIOThreadPool
    /// Uploads in progress on this instance.
    private let uploads = Mutex(0)

    /// Opens the space (created at registration), removes uploads a crash left behind,
    /// and brings the records in step with the files stored.
    init(
        user: String, storage: any Storage, records: any SpaceRecords, uploadDirectory: String, io: NIOThreadPool
    )
        async throws
    {
        self.user = user
        self.storage = storage
        self.records = records
        self.uploadDirectory = uploadDirectory
        self.io = io
        try makeDirectories(uploadDirectory)
        for name in (try? readDirectory(Array(uploadDirectory.utf8))) ?? [] {
            unlink(uploadDirectory + "/" + String(decoding: name, as: UTF8.self))
        }
        try await reconcile(full: !records.shared)
    }

    /// Brings the records in line with the files the storage holds: packs stored but not
    /// indexed (a crash between the two) are indexed from their clear headers; with
    /// `full`, rows of packs that are gone are dropped and the bytes used are counted
    /// again. Records shared with other instances get only the additions when a space is
    /// opened: a full pass while another instance removes a pack could index it again
    /// just before it goes. (A crash between storing and recording a pack then leaves its
    /// bytes uncounted against the quota until `cabackup server admin reconcile`, which
    /// holds the space's lock for its full pass.)
    func reconcile(full: Bool) async throws {
        let storage = storage
        _ = try await records.reconcile(holding: { indexed in
            try await self.blocking { try Self.scan(storage, indexed: indexed, full: full) }
        })
    }

    /// What a reconciliation pass finds in `storage`, whose records index the packs
    /// `indexed`: the packs to index (their blob ids from their clear headers; a pack
    /// whose header cannot be read is left out) and, with `full`, the packs to drop, the
    /// bytes stored and whether a config is. Blocks.
    static func scan(_ storage: any Storage, indexed: Set<String>, full: Bool) throws -> ReconcileFound {
        var found = ReconcileFound()
        // An addition-only pass needs the sizes of the packs the index lacks alone (over
        // S3 each size is a request); a full one counts every file.
        var used: Int64 = 0
        var listed = Set<String>()
        for name in try storage.list(.pack) where full || !indexed.contains(name) {
            let size = try storage.size(.pack, name)
            listed.insert(name)
            used += size
            if !indexed.contains(name), let ids = try? clearEntries(of: name, size: size, in: storage) {
                found.add.append((name, size, ids))
            }
        }
        guard full else { return found }
        for kind in [FileKind.snapshot, .key] {
            for name in try storage.list(kind) { used += try storage.size(kind, name) }
        }
        let config = try storage.stat(.config, "config")
        found.drop = indexed.subtracting(listed)
        found.usedBytes = used + (config ?? 0)
        found.hasConfig = config != nil
        return found
    }

    /// Runs a blocking storage call on the I/O threads.
    func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await io.runIfActive(body)
    }

    /// The blob ids the clear part of a pack's header lists.
    static func clearEntries(of name: String, size: Int64, in storage: any Storage) throws -> [BlobID] {
        let header = try PackFormat.readHeaderBytes(size: size) {
            try storage.read(.pack, name, offset: $0, length: $1, into: $2)
        }
        return try PackFormat.parseClearHeader(header, packSize: size).entries.map(\.id)
    }

    /// Takes one of `limit` upload slots, or nil when all are taken (the caller answers
    /// 503 with Retry-After). Give it back with ``endUpload()``.
    func beginUpload(limit: Int) -> Bool {
        uploads.withLock { n in
            guard n < limit else { return false }
            n += 1
            return true
        }
    }

    func endUpload() { uploads.withLock { $0 -= 1 } }

    /// Verifies an uploaded pack in `temporary` (already hashed to `digest`) and stores it
    /// durably under `name`, then records it. Consumes the temporary file unless it throws.
    func storePack(
        name: String, temporary: String, fd: Int32, size: Int64, digest: ObjectID, reservation: Reservation
    ) async throws {
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
        let storage = self.storage
        await records.extend(reservation)  // storing a large pack may take a while
        try await blocking {
            if (try? storage.size(.pack, name)) != nil {  // stored already: harmless
                unlink(temporary)
            } else {
                try storage.put(.pack, name, file: temporary)
            }
        }
        // Recorded even when it was stored already: the first upload may have been cut
        // (an instance killed) between storing the pack and recording it. A pack counts
        // once.
        try await records.stored(.pack, name, size: size, blobs: ids, reservation: reservation)
    }

    /// Stores a small file (config, key slot, snapshot record) atomically and durably.
    /// The config is written once: of two concurrent first uploads exactly one is stored
    /// (``SpaceRecords/claimConfig()``). At most `maxKeySlots` key slots are kept.
    func storeFile(_ kind: FileKind, _ name: String, _ bytes: [UInt8], quota: Int64?, maxKeySlots: Int) async throws {
        let reservation = try await records.reserve(Int64(bytes.count), quota: quota)
        do {
            try await storeFile(kind, name, bytes, maxKeySlots: maxKeySlots, reservation: reservation)
        } catch {
            await records.release(reservation)
            throw error
        }
        await records.release(reservation)  // a no-op once stored
    }

    private func storeFile(
        _ kind: FileKind, _ name: String, _ bytes: [UInt8], maxKeySlots: Int, reservation: Reservation
    )
        async throws
    {
        let storage = self.storage
        if kind == .config {
            guard try await records.claimConfig() else {
                throw APIError(409, "the space already holds a repository: it is initialized once")
            }
            // A claim taken over from a dead instance may find its config stored: the
            // claim then stays, as the config does.
            var stored = true
            do {
                stored = try await blocking { try storage.stat(.config, "config") != nil }
                if !stored {
                    try await blocking { try bytes.withUnsafeBytes { try storage.put(.config, "config", bytes: $0) } }
                }
            } catch {
                try? await records.unclaimConfig()
                throw error
            }
            if stored { throw APIError(409, "the space already holds a repository: it is initialized once") }
        } else {
            let written = try await blocking { () throws -> Bool in
                if try storage.stat(kind, name) != nil { return false }
                if kind == .key, try storage.list(.key).count >= maxKeySlots {
                    throw APIError(
                        409,
                        "the space holds \(maxKeySlots) key slots, the most it keeps: remove one with 'cabackup key remove' first"
                    )
                }
                try bytes.withUnsafeBytes { try storage.put(kind, name, bytes: $0) }
                return true
            }
            if !written { return }
        }
        try await records.stored(kind, name, size: Int64(bytes.count), blobs: [], reservation: reservation)
    }

    /// Removes a file: first from the records, then from the storage, so a failure between
    /// the two leaves a file the index does not list (it costs an upload again), never an
    /// index listing blobs whose pack is gone (a snapshot would skip storing them).
    func remove(_ kind: FileKind, _ name: String) async throws -> Bool {
        let storage = self.storage
        guard let size = try await blocking({ try storage.stat(kind, name) }) else { return false }
        try await records.removed(kind, name, size: size)
        try await blocking { try storage.remove(kind, name) }
        return true
    }
}
