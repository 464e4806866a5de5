import CABackupCore
import CABackupFormat

/// How ``Repository/changeTags(_:_:)`` changes a snapshot's tags.
public struct TagChange: Sendable {
    public var add: [String]
    public var remove: [String]
    /// Replaces the tags (before `add` and `remove` apply); `nil` keeps them.
    public var set: [String]?

    public init(add: [String] = [], remove: [String] = [], set: [String]? = nil) {
        self.add = add
        self.remove = remove
        self.set = set
    }

    /// The tags of `snapshot` after the change: `set` (or the current ones), without
    /// `remove`, plus `add`, each once, in order.
    public func apply(to tags: [String]) -> [String] {
        var out: [String] = []
        for t in (set ?? tags) + add where !remove.contains(t) && !out.contains(t) { out.append(t) }
        return out
    }
}

extension Repository {
    /// Changes the tags of `snapshots`: each record whose tags change is written anew
    /// (recording its `original`), then the old one is removed with an authenticated
    /// forget record, so other devices see a removal on purpose, not a rollback. An
    /// interruption between the two leaves both records; nothing is lost.
    ///
    /// - Returns: the old and new snapshot of each record that changed.
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for an empty tag or one with a
    ///   comma; the server's refusal for a device that may not delete.
    public func changeTags(_ snapshots: [Snapshot], _ change: TagChange) throws -> [(old: Snapshot, new: Snapshot)] {
        for t in change.add + change.remove + (change.set ?? []) where t.isEmpty || t.contains(",") {
            throw CABackupError.invalidArgument("a tag is not empty and has no comma: '\(t)'")
        }
        let changing = snapshots.filter { change.apply(to: $0.tags) != $0.tags }
        guard !changing.isEmpty else { return [] }
        try checkCanDelete()
        var done: [(old: Snapshot, new: Snapshot)] = []
        for old in changing {
            let record = Snapshot.encodeRecord(retagging: old, tags: change.apply(to: old.tags))
            let new = try commitSnapshot(record, references: [old.tree])
            try forget([old])
            done.append((old, new))
        }
        return done
    }
}
