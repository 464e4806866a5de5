import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// The temporary files this process writes (packs being filled), and the rule that tells
/// a live writer's files from a dead one's.
///
/// Each file is created exclusively and holds an exclusive `flock` for as long as its
/// writer has it open. A process that finds a `*.tmp` file whose lock it can take knows
/// the writer is gone (the kernel drops a dead process's locks, `kill -9` included), so
/// `removeStale(in:)` deletes exactly the leftovers and never the file of a snapshot
/// still running beside it. On an interrupt the program calls ``removeAll()`` to delete
/// its own files on the way out.
public enum TemporaryFiles {
    private struct State {
        var paths = Set<String>()
        /// Set by ``removeAll()``: the process is exiting, no new file may appear.
        var exiting = false
    }

    private static let state = Mutex(State())

    /// Creates a new, empty, locked temporary file `directory/prefix-<pid>-<random>.tmp`,
    /// open for reading and writing.
    package static func create(in directory: String, prefix: String) throws -> (fd: Int32, path: String) {
        while true {
            let path = directory + "/\(prefix)-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).tmp"
            let created: Int32? = try state.withLock { s in
                // An interrupted process deletes its files and exits: none may appear after.
                if s.exiting { return nil }
                let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
                if fd < 0 { throw ioError("create", path) }
                s.paths.insert(path)
                return fd
            }
            guard let fd = created else {
                while true { pause() }
            }
            // Another process's cleanup can see the file before it is locked: it then
            // holds the lock (EWOULDBLOCK here) or has already unlinked it (no links left).
            var st = stat()
            if flock(fd, LOCK_EX | LOCK_NB) == 0 && fstat(fd, &st) == 0 && st.st_nlink > 0 {
                return (fd, path)
            }
            close(fd)
            forget(path)
        }
    }

    /// Stops tracking a file that was renamed into place, uploaded or removed.
    package static func forget(_ path: String) {
        _ = state.withLock { $0.paths.remove(path) }
    }

    /// Deletes every temporary file this process still has, and lets no new one be
    /// created: for a program about to exit after SIGINT or SIGTERM.
    /// - Returns: the number of files deleted.
    @discardableResult
    public static func removeAll() -> Int {
        state.withLock { s in
            s.exiting = true
            var removed = 0
            for path in s.paths where unlink(path) == 0 { removed += 1 }
            s.paths = []
            return removed
        }
    }

    /// Deletes the `*.tmp` files in `directory` that no live process holds: what a
    /// killed writer left.
    /// - Returns: the number of files deleted.
    @discardableResult
    package static func removeStale(in directory: String) -> Int {
        var removed = 0
        for name in (try? readDirectory(Array(directory.utf8))) ?? []
        where name.count > 4 && name.suffix(4) == Array(".tmp".utf8) {
            let path = directory + "/" + String(decoding: name, as: UTF8.self)
            let fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
            if fd < 0 { continue }
            // Held by a live writer (this process's own files included: their lock is on
            // another open file description) when the lock cannot be taken.
            if flock(fd, LOCK_EX | LOCK_NB) == 0 && unlink(path) == 0 { removed += 1 }
            close(fd)
        }
        return removed
    }
}
