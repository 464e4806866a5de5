import CABackupCore
import CABackupFormat
import CABackupStorage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Selects snapshots by host, tag and path (each filter given must match).
public struct SnapshotFilter: Sendable {
    public var hosts: [String] = []
    public var tags: [String] = []
    public var paths: [String] = []

    public init(hosts: [String] = [], tags: [String] = [], paths: [String] = []) {
        self.hosts = hosts
        self.tags = tags
        self.paths = paths
    }

    func matches(_ s: Snapshot) -> Bool {
        if !hosts.isEmpty && !hosts.contains(s.hostname) { return false }
        if !tags.isEmpty && !tags.allSatisfy(s.tags.contains) { return false }
        if !paths.isEmpty && Set(paths.map(absolutePath)) != Set(s.paths) { return false }
        return true
    }
}

/// A cabackup repository: packs of deduplicated, compressed blobs, trees and snapshots,
/// with a derived SQLite index.
///
/// Open one with ``open(path:password:durable:)`` or create one with
/// ``initialize(path:password:chunker:kdf:durable:compression:)``,
/// then ``snapshot(paths:options:progress:)`` to back up, ``snapshots(matching:)`` to list,
/// ``list(_:path:visit:)`` to walk a snapshot, ``restore(_:to:options:progress:events:)`` to restore.
/// A repository object may be used from one thread at a time; the work inside each call
/// runs on several threads.
public final class Repository: @unchecked Sendable {
    // Safe: all stored properties but `currentKeyID` and `treeLoaders` are immutable;
    // `currentKeyID` changes only in `changePassword`, which like every call runs on one
    // thread at a time, `treeLoaders` only behind its lock; the index and storage lock
    // themselves.
    /// Where the files live.
    public let storage: any Storage
    /// The config read at open.
    public let config: RepositoryConfig
    let index: RepositoryIndex
    let chunker: Chunker
    let indexPath: String
    /// The master keys of an encrypted repository; nil for a plaintext one.
    let keys: RepositoryKeys?
    /// The key slot the repository was opened with.
    private(set) var currentKeyID: String?
    /// What the open noticed that the user should hear about without failing (key slots
    /// skipped as unreadable or too costly), one line each.
    public private(set) var warnings: [String] = []
    /// Idle buffers and codecs for loading trees (see ``loadTree(_:)``), only touched
    /// with `treeLoaderLock` held.
    private var treeLoaders: [(BlobBuffers, BlobCodec)] = []
    private let treeLoaderLock = Condition()
    /// Tree packs kept on this device, for a repository not on a local disk.
    let packCache: PackCache?

    private init(
        storage: any Storage, config: RepositoryConfig, keys: RepositoryKeys?, keyID: String?, indexPath: String
    ) throws {
        self.storage = storage
        self.config = config
        self.keys = keys
        self.currentKeyID = keyID
        self.chunker = Chunker(config.chunker)
        self.indexPath = indexPath
        self.index = try RepositoryIndex(path: indexPath, repositoryID: config.id)
        self.packCache =
            storage.workingDirectory == nil
            ? PackCache(directory: cacheDirectory(config.id) + "/packs", storage: storage) : nil
    }

    /// The most bytes of tree packs this device keeps for a repository that is not on a
    /// local disk (default 1 GiB; 0 keeps none). Trees are read from there instead of one
    /// request per directory; see `docs/architecture.md`, "Over a network".
    public var cacheLimit: Int64 {
        get { packCache?.limit ?? 0 }
        set { packCache?.limit = newValue }
    }

    func setCurrentKeyID(_ id: String) { currentKeyID = id }

    /// Creates a new repository in an empty or missing directory.
    ///
    /// - Parameters:
    ///   - path: the repository directory (created if missing, refused if not empty), or
    ///     `http(s)://NAME@HOST:PORT[/PREFIX]` for an empty space on a server.
    ///   - password: the password of the first key slot, which makes the repository
    ///     encrypted (AES-256-GCM, keyed ids); `nil` makes a plaintext repository.
    ///   - chunker: chunking parameters; the default is 512 KiB / 1 MiB / 8 MiB with a
    ///     fresh random Gear seed.
    ///   - kdf: the scrypt cost of the first key slot.
    ///   - durable: fsync every write (leave on except in throwaway tests).
    ///   - compression: the codec new blobs are compressed with, recorded in the config;
    ///     `nil` chooses by storage (see ``defaultCompression(for:)``).
    /// - Throws: ``CABackupError/repositoryExists(_:)`` when the directory is not empty.
    @discardableResult
    public static func initialize(
        path: String, password: String?, chunker: ChunkerParameters? = nil, kdf: KDFParameters = .default,
        durable: Bool = true, compression: RepositoryCompression? = nil
    )
        throws -> Repository
    {
        let storage = try StorageRegistry.open(path, durable: durable)
        return try initialize(
            storage: storage, password: password, chunker: chunker, kdf: kdf, durable: durable, compression: compression
        )
    }

    /// The codec a new repository on `storage` gets when `init` is not told one (`auto`):
    /// zstd where bytes cross a network or are billed (a server space, S3: any storage
    /// without ``StorageCapabilities/localAndTrusted``), LZ4 in a local directory, where
    /// zstd's extra CPU time costs more than the bytes it saves (docs/benchmarks.md,
    /// "zstd or LZ4").
    public static func defaultCompression(for storage: any Storage) -> RepositoryCompression {
        storage.capabilities.contains(.localAndTrusted) ? .lz4 : .zstd
    }

    /// Creates a new repository in an empty storage (for a storage a program supplies;
    /// ``initialize(path:password:chunker:kdf:durable:compression:)`` opens one by location).
    ///
    /// - Parameters:
    ///   - storage: where the files go; it must hold no repository.
    ///   - password: the password of the first key slot; `nil` makes a plaintext
    ///     repository, which only a storage with ``StorageCapabilities/localAndTrusted`` may hold.
    ///   - chunker: chunking parameters (default: 512 KiB / 1 MiB / 8 MiB, fresh seed).
    ///   - kdf: the scrypt cost of the first key slot.
    ///   - durable: fsync what is written locally (the index, this device's records).
    ///   - compression: the codec new blobs are compressed with, recorded in the config;
    ///     `nil` chooses by storage (see ``defaultCompression(for:)``).
    @discardableResult
    public static func initialize(
        storage: any Storage, password: String?, chunker: ChunkerParameters? = nil, kdf: KDFParameters = .default,
        durable: Bool = true, compression: RepositoryCompression? = nil
    )
        throws -> Repository
    {
        if let chunker { try chunker.validate() }
        if let password { try checkNewPassword(password) }
        if !storage.capabilities.contains(.localAndTrusted) && password == nil {
            throw CABackupError.invalidArgument(
                "a repository on \(storage.location) is always encrypted (only a local directory may hold a plaintext one): drop --no-encryption (give a password)"
            )
        }
        try kdf.validate()
        let config = RepositoryConfig.makeNew(
            chunker: chunker, encrypted: password != nil,
            compression: compression ?? defaultCompression(for: storage))
        let keys = password == nil ? nil : RepositoryKeys.random()
        try storage.create()
        var keyID: String?
        if let keys, let password {
            keyID = try writeKeySlot(try KeySlot.make(keys: keys, password: password, kdf: kdf), to: storage)
        }
        // The config is written last: until it exists, there is no repository.
        let configBytes = config.encoded(keys: keys)
        try configBytes.withUnsafeBytes { (raw) throws in
            try storage.put(.config, "config", bytes: raw)
        }
        let warning = KnownRepositories.rememberOrWarn(
            storage.location,
            .init(
                config: sha256(configBytes).hex, formatVersion: config.formatVersion, keySlot: keyID,
                seenNs: wallClockNs()),
            durable: durable)
        let repo = try Repository(
            storage: storage, config: config, keys: keys, keyID: keyID,
            indexPath: try indexPath(storage, config.id))
        repo.warnings = warning.map { [$0] } ?? []
        return repo
    }

    /// Where the derived index of the repository with id `id` lives: in the storage's
    /// working directory (a local repository's `index/`), else in the user's cache
    /// directory, named by the repository id. Makes the directories it needs (with
    /// `tmp/` beside the index, where packs are built).
    static func indexPath(_ storage: any Storage, _ id: String) throws -> String {
        let (dir, tmp) = localDirectories(storage, id)
        for d in [dir, tmp] where !isDirectory(d) { try makeDirectories(d) }
        return dir + "/index.sqlite"
    }

    /// Where packs are built before they are stored (see ``Storage/workingDirectory``).
    var stagingDirectory: String { Self.localDirectories(storage, config.id).staging }

    /// The directories this device keeps for a repository: its index and its staging.
    private static func localDirectories(_ storage: any Storage, _ id: String) -> (index: String, staging: String) {
        guard let root = storage.workingDirectory else { return (cacheDirectory(id), cacheDirectory(id) + "/tmp") }
        return (root + "/index", root + "/tmp")
    }

    /// Throws ``CABackupError/repositoryExists(_:)`` unless `path` is missing or an empty
    /// directory (so a tool can refuse before asking for a new password).
    public static func checkCanInitialize(path: String) throws {
        try StorageRegistry.open(path).checkCanCreate()
    }

    /// Opens an existing repository and brings its index up to date with the packs and
    /// snapshot records on disk (rebuilding it if it was deleted).
    ///
    /// - Parameters:
    ///   - path: the repository directory, or `http(s)://NAME@HOST:PORT[/PREFIX]` for a
    ///     private data space on a `cabackup server` this device is logged in to.
    ///   - password: needed when the repository is encrypted; ignored otherwise.
    ///   - durable: fsync every write (leave on except in throwaway tests).
    /// - Throws: ``CABackupError/repositoryNotFound(_:)`` when there is no config,
    ///   ``CABackupError/notARepository(_:)`` when there is none in a directory holding other files,
    ///   ``CABackupError/unsupportedVersion(found:supported:)`` for a newer format,
    ///   ``CABackupError/passwordRequired(_:)`` or ``CABackupError/wrongPassword(_:)``.
    public static func open(path: String, password: String? = nil, durable: Bool = true) throws -> Repository {
        try open(
            path: path,
            passwordProvider: {
                guard let password else { throw CABackupError.passwordRequired(path) }
                return password
            }, durable: durable)
    }

    /// Opens an existing repository, asking `passwordProvider` for the password only if
    /// the repository is encrypted (so a command line tool prompts only when it must).
    ///
    /// - Parameters:
    ///   - path: the repository directory, or `http(s)://NAME@HOST:PORT[/PREFIX]` for a
    ///     private data space on a `cabackup server` this device is logged in to.
    ///   - passwordProvider: called at most once, when the config says the repository is
    ///     encrypted; it may throw (for example when no password is available).
    ///   - durable: fsync every write (leave on except in throwaway tests).
    public static func open(
        path: String, passwordProvider: () throws -> String, durable: Bool = true
    ) throws -> Repository {
        try open(path: path, passwordProvider: passwordProvider, durable: durable, trustNewConfig: false)
    }

    /// Opens a repository whose config changed since this device first saw it (it was
    /// re-created on purpose at the same location) and remembers the new config: the
    /// password must open it, and everything the config says is checked as at any open.
    /// What `cabackup trust` does.
    public static func trustNewConfig(
        path: String, passwordProvider: () throws -> String, durable: Bool = true
    ) throws -> Repository {
        try open(path: path, passwordProvider: passwordProvider, durable: durable, trustNewConfig: true)
    }

    private static func open(
        path: String, passwordProvider: () throws -> String, durable: Bool, trustNewConfig: Bool
    ) throws -> Repository {
        try open(
            storage: StorageRegistry.open(path, durable: durable), passwordProvider: passwordProvider,
            durable: durable, trustNewConfig: trustNewConfig)
    }

    /// Opens an existing repository in a storage a program supplies (see
    /// ``open(path:passwordProvider:durable:)``, which opens one by location).
    public static func open(
        storage: any Storage, passwordProvider: () throws -> String, durable: Bool = true
    ) throws -> Repository {
        try open(storage: storage, passwordProvider: passwordProvider, durable: durable, trustNewConfig: false)
    }

    private static func open(
        storage: any Storage, passwordProvider: () throws -> String, durable: Bool, trustNewConfig: Bool
    ) throws -> Repository {
        let path = storage.location
        guard try storage.exists() else { throw storage.missingRepositoryError() }
        let bytes = try storage.read(.config, "config")
        guard bytes.count <= FileKind.config.maxWholeFileSize else {
            throw CABackupError.badConfig(path: path + "/config", reason: "\(bytes.count) bytes is not a config")
        }
        let file = try ConfigFile.decode(bytes, path: path + "/config")
        let digest = sha256(bytes).hex
        if !file.isEncrypted && !storage.capabilities.contains(.localAndTrusted) {
            throw CABackupError.untrusted(
                "the repository config at \(path) says it is not encrypted, but only a local directory may hold a plaintext repository: the storage may be hostile; nothing was read or written"
            )
        }
        let known = KnownRepositories.entry(path)
        if let known, !trustNewConfig, digest != known.config || file.formatVersion < known.formatVersion {
            let lower =
                file.formatVersion < known.formatVersion
                ? " (down to format version \(file.formatVersion) from the \(known.formatVersion) seen there)" : ""
            throw CABackupError.untrusted(
                "the repository config at \(path) changed since this device first opened it\(lower): the storage may be hostile; nothing was read or written. If you re-created the repository there yourself, run 'cabackup trust --repo \(path)'"
            )
        }
        var keys: RepositoryKeys?
        var keyID: String?
        var warnings: [String] = []
        if file.isEncrypted {
            let opened = try unlock(storage, password: try passwordProvider(), preferred: known?.keySlot)
            (keys, keyID) = (opened.keys, opened.slot)
            warnings += opened.skipped.map {
                "key slot \($0.prefix(8)) was skipped: it is unreadable or its scrypt parameters are outside the allowed bounds (remove it with 'cabackup key remove \($0.prefix(8))')"
            }
        }
        let config = try file.resolve(keys: keys, path: path + "/config")
        let repo = try Repository(
            storage: storage, config: config, keys: keys, keyID: keyID, indexPath: try indexPath(storage, config.id))
        try repo.synchronizeIndex()
        // The newest snapshot this device saw here must still be here, unless a forget
        // record (sealed with the key) says it was removed on purpose.
        let newest = try repo.index.newestSnapshot()
        if let seen = known?.newestSnapshot.flatMap({ ObjectID(hex: $0) }), !trustNewConfig,
            try !repo.index.hasSnapshot(seen), try !repo.index.wasForgotten(seen)
        {
            warnings.append(
                "snapshot \(seen.shortHex), the newest this device saw in \(path), is gone and no forget made with the key removed it: the storage may have deleted it or rolled the repository back; check what is missing with 'cabackup snapshots'"
            )
        }
        var entry = KnownRepositories.Entry(
            location: path, config: digest,
            formatVersion: max(file.formatVersion, trustNewConfig ? 0 : known?.formatVersion ?? 0), keySlot: keyID,
            seenNs: known?.seenNs ?? 0, newestSnapshot: newest?.id.hex ?? known?.newestSnapshot)
        if entry != known {
            // Written only when something changed; fsynced only when the pin itself did.
            let pinChanged = known?.config != entry.config || known?.formatVersion != entry.formatVersion
            entry.seenNs = wallClockNs()
            if let warning = KnownRepositories.rememberOrWarn(path, entry, durable: durable && pinChanged) {
                warnings.append(warning)
            }
        }
        repo.warnings = warnings
        return repo
    }

    /// Tells the device's memory of this repository about a snapshot it just saved, so a
    /// storage that drops it is noticed even before the next listing.
    func rememberNewest(_ id: SnapshotID) {
        guard var entry = KnownRepositories.entry(storage.location) else { return }
        entry.newestSnapshot = id.hex
        _ = KnownRepositories.rememberOrWarn(storage.location, entry, durable: false)
    }

    // MARK: What the storage offers

    /// Takes the repository lock: shared for writers that only add (snapshots), exclusive
    /// for those that delete (prune, key removal). The storage's own lock when it has one
    /// (`flock` on a local disk, a lease on a server), else lock objects stored in it
    /// (see ``LockObjects``). Released with the returned handle; a process that dies
    /// never leaves a lock that needs a human.
    /// - Throws: ``CABackupError/locked(_:)`` when the lock is held in a conflicting mode.
    public func lock(exclusive: Bool) throws -> RepositoryLock {
        if let native = try storage.nativeLock(exclusive: exclusive) { return native }
        return try LockObjects(storage: storage).acquire(exclusive: exclusive)
    }

    /// Whether committing a snapshot needs the ids of the blobs it references (a server
    /// space checks it holds them all; any other storage does not).
    var commitNeedsReferences: Bool { storage.space != nil }

    /// Stores a snapshot or forget record: through the space's checked commit on a
    /// server, as a plain file anywhere else.
    func storeRecord(_ name: String, _ raw: UnsafeRawBufferPointer, references: [BlobID]) throws {
        if let space = storage.space {
            try space.commitSnapshot(name, raw, references: references)
        } else {
            try storage.put(.snapshot, name, bytes: raw)
        }
    }

    /// Throws when this device may add but not delete (an append-only token on a
    /// server), before an operation that deletes changes anything.
    func checkCanDelete() throws { try storage.space?.checkCanDelete() }

    /// A per-thread blob codec for this repository's id scheme, encryption and codec.
    func makeCodec() -> BlobCodec { BlobCodec(keys: keys, compression: config.compression) }

    /// A cipher context for sealing or opening pack headers, in an encrypted repository.
    func makeAEAD() -> AESGCM? { keys.map { AESGCM(key: $0.encryption) } }

    /// Reads and parses a stored pack's header (opening its sealed details).
    func readPackHeader(_ id: PackID) throws -> [PackEntry] {
        try PackFormat.readHeader(from: storage, name: id.hex, aead: makeAEAD())
    }

    /// The stored form of a snapshot record.
    func sealRecord(_ plain: [UInt8]) -> [UInt8] {
        guard let aead = makeAEAD() else { return plain }
        return aead.seal(plain, aad: SealedKind.snapshot)
    }

    /// Parses a stored snapshot record, verifying it against its name and opening it.
    func decodeRecord(id: SnapshotID, stored: [UInt8]) throws -> Snapshot {
        guard sha256(stored) == id else {
            throw CABackupError.corrupt(what: "snapshot \(id.hex)", reason: "content does not match its id")
        }
        var plain = stored
        if let aead = makeAEAD() {
            guard let p = aead.open(stored, aad: SealedKind.snapshot) else {
                throw CABackupError.corrupt(what: "snapshot \(id.hex)", reason: "authentication failed")
            }
            plain = p
        }
        return try Snapshot.decode(id: id, json: plain)
    }

    /// The snapshot ids a stored forget record names, or nil when the bytes are not one
    /// (or do not match their name, or do not open with the key).
    func decodeForget(id: SnapshotID, stored: [UInt8]) -> [SnapshotID]? {
        guard sha256(stored) == id else { return nil }
        var plain = stored
        if let aead = makeAEAD() {
            guard let p = aead.open(stored, aad: SealedKind.forget) else { return nil }
            plain = p
        }
        return ForgetRecord.decode(plain)
    }

    /// Stores a forget record naming `ids` (before they are removed) and indexes it.
    func writeForgetRecord(_ ids: [SnapshotID]) throws {
        let plain = ForgetRecord.encode(ids)
        let bytes = makeAEAD().map { $0.seal(plain, aad: SealedKind.forget) } ?? plain
        let id = sha256(bytes)
        try bytes.withUnsafeBytes { (raw) throws in try storeRecord(id.hex, raw, references: []) }
        try index.addForget(id, forgotten: ids)
    }

    // MARK: Index

    /// Adds packs and snapshots present in storage but missing from the index, and
    /// drops index entries whose files are gone. Cheap when nothing changed: a listing
    /// of `snapshots/` and of the 256 `data/` subdirectories.
    public func synchronizeIndex() throws {
        let stored = Set(try storage.list(.pack).compactMap { ObjectID(hex: $0) })
        let indexed = try index.packIDs()
        // Over a network each header costs a round trip or two: many are read at once.
        let threads = storage.workingDirectory == nil ? 8 : 1
        let new = stored.subtracting(indexed).sorted()
        for part in stride(from: 0, to: new.count, by: 256) {
            let batch = Array(new[part..<min(new.count, part + 256)])
            let headers = concurrentMap(batch, threads: threads) { [self] id -> (PackID, Int64, [PackEntry])? in
                // An unreadable pack is reported by `check`; it is not indexed, so its
                // blobs count as missing and are stored again by the next backup.
                guard let size = try? storage.size(.pack, id.hex),
                    let entries = try? PackFormat.readHeader(from: storage, name: id.hex, size: size, aead: makeAEAD())
                else { return nil }
                return (id, size, entries)
            }
            for case let (id, size, entries)? in headers { try index.addPack(id, size: size, entries: entries) }
        }
        try index.removePacks(indexed.subtracting(stored))
        packCache?.remove(indexed.subtracting(stored))

        let storedSnaps = Set(try storage.list(.snapshot).compactMap { ObjectID(hex: $0) })
        let indexedSnaps = Set(try index.snapshotRecords().map(\.id))
        let indexedForgets = try index.forgetIDs()
        let newRecords = Array(storedSnaps.subtracting(indexedSnaps).subtracting(indexedForgets))
        let records = concurrentMap(newRecords, threads: threads) { [self] id in
            (id, try? storage.read(.snapshot, id.hex))
        }
        for case let (id, bytes?) in records {
            if let snap = try? decodeRecord(id: id, stored: bytes) {
                try index.addSnapshot(id, timeNs: snap.timeNs, record: bytes)
            } else if let forgotten = decodeForget(id: id, stored: bytes) {
                try index.addForget(id, forgotten: forgotten)
            }
        }
        for id in indexedSnaps.subtracting(storedSnaps) { try index.removeSnapshot(id) }
        for id in indexedForgets.subtracting(storedSnaps) { try index.removeForget(id) }
    }

    /// Deletes the index and rebuilds it from the pack headers and snapshot records.
    public func rebuildIndex() throws {
        try index.removePacks(try index.packIDs())
        for (id, _) in try index.snapshotRecords() { try index.removeSnapshot(id) }
        try synchronizeIndex()
    }

    /// How many packs, blobs and snapshots the index holds.
    public func indexCounts() throws -> (packs: Int, blobs: Int, snapshots: Int) { try index.counts() }

    /// Every indexed blob location as sorted text rows, for comparing indexes.
    public func indexDump() throws -> [String] { try index.allBlobRows() }

    // MARK: Blobs

    /// Loads a blob, decompresses (and opens) it and verifies it against its id.
    ///
    /// - Throws: ``CABackupError/blobNotFound(_:)`` when no pack holds it,
    ///   ``CABackupError/corrupt(what:reason:)`` when the stored bytes do not match.
    public func loadBlob(_ id: BlobID) throws -> [UInt8] {
        let buffers = BlobBuffers()
        let n = try loadBlob(id, into: buffers, codec: makeCodec())
        return Array(buffers.bytes(n))
    }

    /// The length of a blob's content, from the index (nothing is read).
    ///
    /// - Throws: ``CABackupError/blobNotFound(_:)`` when no pack holds it.
    public func blobSize(_ id: BlobID) throws -> Int {
        guard let loc = try index.lookup(id) else { throw CABackupError.blobNotFound(id) }
        return loc.rawLength
    }

    /// Loads a blob into `buffers.output` (grown as needed, never zero-filled), verified
    /// against its id. Returns its length.
    func loadBlob(_ id: BlobID, into buffers: BlobBuffers, codec: BlobCodec) throws -> Int {
        guard let loc = try index.lookup(id) else { throw CABackupError.blobNotFound(id) }
        return try loadBlob(id, at: loc, into: buffers, codec: codec)
    }

    /// Loads a blob from a known location. Afterwards ``BlobBuffers/stored`` holds its
    /// stored bytes, for copying them unchanged (prune).
    func loadBlob(_ id: BlobID, at loc: BlobLocation, into buffers: BlobBuffers, codec: BlobCodec) throws -> Int {
        try checkPlausible(id, loc)
        let plainAsStored = codec.aead == nil && loc.compression == .none
        // A blob stored as it is needs no second buffer: it is read straight into the output.
        buffers.reserve(output: loc.rawLength, input: plainAsStored ? 0 : loc.length, middle: 0)
        let into = plainAsStored ? buffers.output : buffers.input
        let cached = loc.length > 0 ? try readStored(loc, into: into) : false
        let stored = UnsafeRawBufferPointer(start: into, count: loc.length)
        buffers.stored = stored
        do {
            _ = try decodeBlob(id, at: loc, stored: stored, into: buffers, codec: codec)
        } catch let error as CABackupError where cached {
            // The cached copy was changed on this disk: drop it and ask the storage.
            guard case .corrupt = error else { throw error }
            packCache?.remove([loc.pack])
            try storage.read(.pack, loc.pack.hex, offset: loc.offset, length: loc.length, into: into)
            _ = try decodeBlob(id, at: loc, stored: stored, into: buffers, codec: codec)
        }
        return loc.rawLength
    }

    private func checkPlausible(_ id: BlobID, _ loc: BlobLocation) throws {
        guard loc.rawLength <= 1 << 30, loc.length <= 1 << 30 else {
            throw CABackupError.corrupt(what: "blob \(id.hex) in pack \(loc.pack.hex)", reason: "implausible length")
        }
    }

    /// Opens, decompresses and verifies a blob's stored bytes (read by the caller, e.g.
    /// as part of a run of a pack). Returns its plaintext: in `buffers.output`, or `stored`
    /// itself for a blob of a plaintext repository stored as it is.
    func decodeBlob(
        _ id: BlobID, at loc: BlobLocation, stored: UnsafeRawBufferPointer, into buffers: BlobBuffers,
        codec: BlobCodec
    ) throws -> UnsafeRawBufferPointer {
        let what = "blob \(id.hex) in pack \(loc.pack.hex)"
        try checkPlausible(id, loc)
        var payload: UnsafeRawBufferPointer
        if let aead = codec.aead {
            guard loc.length >= AESGCM.overhead else {
                throw CABackupError.corrupt(what: what, reason: "shorter than its seal")
            }
            let n = loc.length - AESGCM.overhead
            buffers.reserve(output: loc.rawLength, input: 0, middle: loc.compression == .none ? 0 : n)
            let into = loc.compression == .none ? buffers.output : buffers.middle
            guard n == loc.rawLength || loc.compression != .none,
                aead.open(stored, aad: SealedKind.blob, into: into) == n
            else {
                throw CABackupError.corrupt(what: what, reason: "authentication failed: its bytes were changed")
            }
            payload = UnsafeRawBufferPointer(start: into, count: n)
        } else {
            payload = stored
        }
        let plain: UnsafeRawBufferPointer
        switch loc.compression {
        case .none:
            guard payload.count == loc.rawLength else {
                throw CABackupError.corrupt(what: what, reason: "stored length differs from its raw length")
            }
            plain = payload
        case .lz4, .zstd:
            buffers.reserve(output: loc.rawLength, input: 0, middle: 0)
            let ok = codec.decompress(
                payload, loc.compression,
                into: UnsafeMutableRawBufferPointer(start: buffers.output, count: loc.rawLength))
            guard ok else { throw CABackupError.corrupt(what: what, reason: "\(loc.compression) data does not decode") }
            plain = buffers.bytes(loc.rawLength)
        }
        guard codec.id(plain) == id else {
            throw CABackupError.corrupt(what: what, reason: "content does not match its id")
        }
        return plain
    }

    /// Reads a blob's stored bytes: a tree from the pack cache when there is one, anything
    /// else (and a tree the cache cannot hold) from the storage.
    /// Returns whether the bytes came from the cache.
    @discardableResult
    func readStored(_ loc: BlobLocation, into buffer: UnsafeMutableRawPointer) throws -> Bool {
        if loc.type == .tree, let cache = packCache,
            cache.read(
                loc.pack, offset: loc.offset, length: loc.length, into: buffer,
                treePacks: { try index.packsHolding(.tree) })
        {
            return true
        }
        try storage.read(.pack, loc.pack.hex, offset: loc.offset, length: loc.length, into: buffer)
        return false
    }

    /// The entries of a directory node (all its tree parts), in name order.
    public func loadDirectory(_ node: Node) throws -> [Node] {
        try loadTrees(node.subtrees)
    }

    /// Decodes one tree blob, loaded with buffers and a codec from a small pool: walks
    /// (snapshot, restore, check, diff, ls, prune) load a tree per directory, and each new
    /// codec costs key schedules and HMAC pads.
    func loadTree(_ id: BlobID) throws -> [Node] {
        let (buffers, codec) = treeLoaderLock.locked { treeLoaders.popLast() } ?? (BlobBuffers(), makeCodec())
        defer { treeLoaderLock.locked { if treeLoaders.count < 4 { treeLoaders.append((buffers, codec)) } } }
        let bytes = Array(buffers.bytes(try loadBlob(id, into: buffers, codec: codec)))
        do {
            let nodes = try TreeCodec.decode(bytes)
            for n in nodes where !isSafeName(n.name) {
                throw CABackupError.corrupt(what: "tree \(id.hex)", reason: "unsafe entry name \(displayPath(n.name))")
            }
            return nodes
        } catch let e as FormatError {
            throw CABackupError.corrupt(what: "tree \(id.hex)", reason: e.description)
        } catch let e as CABackupError {
            throw e
        } catch {
            throw CABackupError.corrupt(what: "tree \(id.hex)", reason: "\(error)")
        }
    }

    // MARK: Snapshots

    /// Snapshots matching `filter`, oldest first.
    public func snapshots(matching filter: SnapshotFilter = SnapshotFilter()) throws -> [Snapshot] {
        var out: [Snapshot] = []
        for (id, record) in try index.snapshotRecords() {
            let s = try decodeRecord(id: id, stored: record)
            if filter.matches(s) { out.append(s) }
        }
        return out
    }

    /// The snapshot a new snapshot of `paths` from `hostname` builds on (and that
    /// `status` compares with): the latest of the same host and path set.
    public func parentSnapshot(paths: [String], hostname: String) throws -> Snapshot? {
        try snapshots(matching: SnapshotFilter(hosts: [hostname], paths: paths)).last
    }

    /// Resolves `latest`, a full id or a unique prefix of at least 8 hex digits.
    ///
    /// - Throws: ``CABackupError/snapshotNotFound(_:)``, ``CABackupError/ambiguousSnapshot(_:matches:)``
    ///   or ``CABackupError/badSnapshotReference(_:)``.
    public func findSnapshot(
        _ reference: String, matching filter: SnapshotFilter = SnapshotFilter()
    )
        throws -> Snapshot
    {
        let all = try snapshots(matching: filter)
        if reference == "latest" {
            guard let last = all.last else { throw CABackupError.snapshotNotFound(reference) }
            return last
        }
        let ref = reference.lowercased()
        guard ref.count >= 8, ref.count <= 64, ref.utf8.allSatisfy({ isHexDigit($0) }) else {
            throw CABackupError.badSnapshotReference(reference)
        }
        let matches = all.filter { $0.id.hex.hasPrefix(ref) }
        guard let first = matches.first else { throw CABackupError.snapshotNotFound(reference) }
        guard matches.count == 1 else { throw CABackupError.ambiguousSnapshot(reference, matches: matches.count) }
        return first
    }

    /// Stores a snapshot record (the commit point) and indexes it.
    func commitSnapshot(_ plain: [UInt8], references: [BlobID] = []) throws -> Snapshot {
        let bytes = sealRecord(plain)
        let id = sha256(bytes)
        let snap = try decodeRecord(id: id, stored: bytes)
        try bytes.withUnsafeBytes { (raw) throws in
            try storeRecord(id.hex, raw, references: references)
        }
        try index.addSnapshot(id, timeNs: snap.timeNs, record: bytes)
        rememberNewest(id)
        return snap
    }
}

/// Reusable buffers for loading blobs: the stored bytes, the opened payload of a sealed
/// compressed blob, and the plaintext. Grown as needed and never zero-filled, so loading
/// a chunk allocates nothing in steady state.
final class BlobBuffers {
    private(set) var input: UnsafeMutableRawPointer
    private(set) var middle: UnsafeMutableRawPointer
    private(set) var output: UnsafeMutableRawPointer
    private var capacities = [1, 1, 1]
    /// The stored bytes of the blob last loaded.
    var stored = UnsafeRawBufferPointer(start: nil, count: 0)

    init() {
        input = .allocate(byteCount: 1, alignment: 64)
        middle = .allocate(byteCount: 1, alignment: 64)
        output = .allocate(byteCount: 1, alignment: 64)
    }

    deinit {
        input.deallocate()
        middle.deallocate()
        output.deallocate()
    }

    private static func grow(_ p: inout UnsafeMutableRawPointer, _ capacity: inout Int, to n: Int) {
        guard n > capacity else { return }
        p.deallocate()
        capacity = max(n, capacity * 2)
        p = .allocate(byteCount: capacity, alignment: 64)
    }

    func reserve(output n: Int, input m: Int, middle k: Int) {
        Self.grow(&output, &capacities[0], to: n)
        Self.grow(&input, &capacities[1], to: m)
        Self.grow(&middle, &capacities[2], to: k)
    }

    /// The first `n` bytes of the output buffer.
    func bytes(_ n: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: output, count: n) }
}

@inline(__always)
func isHexDigit(_ c: UInt8) -> Bool {
    (c >= 48 && c <= 57) || (c >= 97 && c <= 102) || (c >= 65 && c <= 70)
}

/// A name a tree may hold: not empty, not `.` or `..`, no `/` and no NUL.
func isSafeName(_ name: [UInt8]) -> Bool {
    !name.isEmpty && name != [0x2E] && name != [0x2E, 0x2E] && !name.contains(0x2F) && !name.contains(0)
}
