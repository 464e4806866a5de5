import CABackupCore
import CABackupFormat

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

extension Repository {
    /// Backs up what can be read from `fd` (standard input by default) as one file,
    /// `/filename`, of a new snapshot (restic's `backup --stdin`).
    ///
    /// The bytes are streamed through the chunker in two pooled read windows, so a stream
    /// of any length needs bounded memory. The file gets mode 0644, the current user and
    /// group, and the current time; the root directory is `/` with its own metadata.
    /// ``SnapshotOptions/tags``, ``SnapshotOptions/hostname`` and
    /// ``SnapshotOptions/dryRun`` apply; the other options concern walks and are ignored.
    ///
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for a name that is empty, `.`,
    ///   `..` or holds `/` or a NUL; I/O errors reading `fd` (nothing is committed then).
    public func snapshot(
        stdin fd: Int32 = 0, filename: String, options: SnapshotOptions = SnapshotOptions(),
        progress: ((SnapshotProgress) -> Void)? = nil
    ) throws -> SnapshotResult {
        guard !filename.isEmpty, filename != ".", filename != "..", !filename.contains("/"),
            !filename.utf8.contains(0)
        else {
            throw CABackupError.invalidArgument("the name of the file read from stdin must not be empty or hold '/'")
        }
        let name = Array(filename.utf8)
        let path = [UInt8(ascii: "/")] + name
        let start = monotonicSeconds()
        let startNs = wallClockNs()
        let hostname = options.hostname ?? currentHostname()
        let lock = try self.lock(exclusive: false)
        defer { withExtendedLifetime(lock) {} }
        return try index.sharingReads {
            let parent = try? parentSnapshot(paths: [displayPath(path)], hostname: hostname)
            let ((root, bytes, chunksAdded), written) = try withBlobWriter(forSnapshot: true, dryRun: options.dryRun) {
                saver in
                let files = FileSaver(repository: self, writer: saver, workers: 1)
                defer { try? files.finish() }
                let (ids, bytes, added) = try storeStream(fd, path: path, saver: saver) { read in
                    progress?(
                        SnapshotProgress(
                            filesDone: 0, bytesRead: read, bytesAdded: saver.bytesAdded.load(ordering: .relaxed),
                            elapsedSeconds: monotonicSeconds() - start, currentPath: displayPath(path), totalFiles: 1,
                            totalBytes: 0, scanFinished: false))
                }
                options.onFile?(
                    SnapshotFileEvent(action: parent == nil ? .new : .changed, pathBytes: path, size: bytes))
                var st = stat()
                st.st_mode = mode_t(S_IFREG | 0o644)
                st.st_uid = getuid()
                st.st_gid = getgid()
                st.st_size = off_t(bytes)
                st.st_nlink = 1
                st.st_mtim = timespecFrom(ns: wallClockNs())
                st.st_ctim = st.st_mtim
                var node = makeNode(name: name, st: st)
                node.content = ids
                var rootStat = stat()
                if stat("/", &rootStat) != 0 { throw ioError("stat", [UInt8(ascii: "/")]) }
                let pd = PendingDirectory(node: makeNode(name: [0x2F], st: rootStat), isRoot: true)
                pd.entries.append(.done(node))
                let trees = TreeSaver(files: files, writer: saver, codec: makeCodec())
                return (try trees.finish(root: pd), bytes, added)
            }
            var summary = SnapshotSummary()
            summary.filesTotal = 1
            summary.bytesTotal = bytes
            summary.chunksAdded = chunksAdded
            summary.durationSeconds = monotonicSeconds() - start
            progress?(
                SnapshotProgress(
                    filesDone: 1, bytesRead: bytes, bytesAdded: written.bytesAdded,
                    elapsedSeconds: summary.durationSeconds,
                    currentPath: "", totalFiles: 1, totalBytes: bytes, scanFinished: true))
            let snap = try commitRecord(
                time: startNs, hostname: hostname, paths: [displayPath(path)], tags: options.tags, parent: parent?.id,
                tree: root.subtrees[0], summary: summary, written: written, dryRun: options.dryRun)
            return SnapshotResult(snapshot: snap, warnings: [])
        }
    }

    /// Reads `fd` to its end through the chunker and stores the chunks the repository
    /// lacks, on the calling thread; returns the chunk ids, the bytes read and the chunks
    /// added. `progress` gets the bytes read after each window.
    private func storeStream(
        _ fd: Int32, path: [UInt8], saver: BlobSaver, progress: (Int64) -> Void
    ) throws -> ([BlobID], Int64, Int) {
        let codec = makeCodec()
        let window = max(FileSaver.windowSize, ChunkingReader.minimumWindow(maxChunk: config.chunker.maxSize))
        let pool = BufferPool(bufferSize: window, maxCount: 2)
        // A size hint above the small-file limit: full windows from the first read.
        let reader = ChunkingReader(
            chunker: chunker, fd: fd, path: path, sizeHint: Int64(window), windowSize: window, pool: pool)
        var ids: [BlobID] = []
        var added = 0
        while let w = try reader.nextWindow() {
            for cut in w.cuts {
                let raw = w.buffer.bytes(cut.offset, cut.length)
                let id = codec.id(raw)
                if try saver.claim(id) {
                    try saver.addEncoding(id, type: .data, raw: raw, codec: codec)
                    added += 1
                }
                ids.append(id)
            }
            progress(reader.bytesRead)
        }
        return (ids, reader.bytesRead, added)
    }

    /// Encodes a snapshot record and stores it (the commit point), or with `dryRun` only
    /// makes the snapshot it would be. `bytes_added` counts the record itself too; its
    /// size depends on the number, so it is settled by iterating until it is stable.
    func commitRecord(
        time startNs: Int64, hostname: String, paths: [String], tags: [String], parent: SnapshotID?, tree: BlobID,
        summary: SnapshotSummary, written: BlobWriterTotals, dryRun: Bool
    ) throws -> Snapshot {
        var summary = summary
        var added = written.bytesAdded
        var record: [UInt8] = []
        for _ in 0..<4 {
            summary.bytesAdded = added
            record = Snapshot.encodeRecord(
                time: formatRFC3339(ns: startNs), hostname: hostname, username: currentUsername(), paths: paths,
                tags: tags, parent: parent, tree: tree, summary: summary)
            let total = written.bytesAdded + Int64(record.count)
            if total == added { break }
            added = total
        }
        if dryRun {
            let sealed = sealRecord(record)
            return try decodeRecord(id: sha256(sealed), stored: sealed)
        }
        return try commitSnapshot(record, references: written.references)
    }
}
