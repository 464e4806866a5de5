import CABackupCore
import CABackupFormat

/// What ``Repository/rewrite(_:excluding:caseInsensitiveExcludes:forgetOriginal:dryRun:)``
/// did to one snapshot.
public struct RewriteResult: Sendable {
    public var original: Snapshot
    /// The rewritten snapshot; `nil` on a dry run or when nothing matched.
    public var rewritten: Snapshot?
    /// The paths removed (a directory counts once, with everything below it).
    public var removed: [String]
}

extension Repository {
    /// Removes the entries matching the exclude patterns (the `--exclude` rules) from a
    /// snapshot: the trees above them are written anew, everything else is reused, and a
    /// new snapshot record names the original. With `forgetOriginal` the original is then
    /// removed with an authenticated forget record, and `prune` frees the removed files'
    /// data once no snapshot uses it. Nothing matched: nothing is written.
    ///
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for a bad pattern; a damaged tree;
    ///   the server's refusal to forget for a device that may not delete.
    public func rewrite(
        _ snapshot: Snapshot, excluding excludes: [String], caseInsensitiveExcludes: [String] = [],
        forgetOriginal: Bool = false, dryRun: Bool = false
    ) throws -> RewriteResult {
        let rules = try ExcludeRules(excludes: excludes, caseInsensitiveExcludes: caseInsensitiveExcludes)
        if forgetOriginal && !dryRun { try checkCanDelete() }
        var removed: [String] = []
        // Finds what goes first; a dry run stops there.
        func scan(_ nodes: [Node], _ path: [UInt8]) throws {
            for n in nodes {
                let p = path + [0x2F] + n.name
                if rules.isExcluded(path: p) {
                    removed.append(displayPath(p))
                } else if n.type == .directory {
                    try scan(try loadDirectory(n), p)
                }
            }
        }
        try scan(try loadTree(snapshot.tree), [])
        var result = RewriteResult(original: snapshot, rewritten: nil, removed: removed)
        guard !removed.isEmpty, !dryRun else { return result }

        let lock = try self.lock(exclusive: false)
        defer { withExtendedLifetime(lock) {} }
        let (root, written) = try withBlobWriter(forSnapshot: true) { saver -> BlobID in
            let codec = makeCodec()
            func store(_ bytes: [UInt8]) throws -> BlobID {
                try bytes.withUnsafeBytes { (raw) throws in
                    let id = codec.id(raw)
                    if try saver.claim(id) { try saver.addEncoding(id, type: .tree, raw: raw, codec: codec) }
                    return id
                }
            }
            /// The directory's entries without the excluded ones; `nil` when none changed.
            func rewritten(_ nodes: [Node], _ path: [UInt8]) throws -> [Node]? {
                var out: [Node] = []
                var changed = false
                for var n in nodes {
                    let p = path + [0x2F] + n.name
                    if rules.isExcluded(path: p) {
                        changed = true
                        continue
                    }
                    if n.type == .directory {
                        if let inner = try rewritten(try loadDirectory(n), p) {
                            n.subtrees = try TreeCodec.encodeParts(inner).map(store)
                            changed = true
                        } else {
                            saver.reuse(n.subtrees)
                        }
                    }
                    out.append(n)
                }
                return changed ? out : nil
            }
            let top = try loadTree(snapshot.tree)
            return try store(TreeCodec.encodeSingle(try rewritten(top, []) ?? top))
        }
        let record = Snapshot.encodeRecord(retagging: snapshot, tags: snapshot.tags, tree: root)
        result.rewritten = try commitSnapshot(record, references: written.references)
        if forgetOriginal { try forget([snapshot]) }
        return result
    }
}
