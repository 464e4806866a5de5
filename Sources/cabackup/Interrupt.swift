import CABackup
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// SIGINT and SIGTERM: the command in progress stops, the process deletes its own
/// temporary files, says what was kept, and exits with code 130.
///
/// The signal handler only writes a byte to a pipe (all a handler may safely do); a
/// thread waiting on the pipe does the rest outside signal context.
enum Interrupt {
    /// What the command in progress says when interrupted, given the bytes of packs this
    /// process stored (which the next run reuses).
    static let message = Mutex<@Sendable (Int64) -> String>({ _ in "interrupted" })

    /// An interrupted snapshot saved no snapshot record; the packs it stored stay for the
    /// next snapshot to reuse.
    static func duringSnapshot() {
        message.withLock {
            $0 = { stored in
                stored == 0
                    ? "interrupted: nothing saved"
                    : "interrupted: nothing saved; \(formatBytes(stored)) already stored will be reused by the next snapshot"
            }
        }
    }

    /// When set, the first SIGINT or SIGTERM calls it instead of ending the process (a
    /// mount unmounts and returns from its loop); a second one ends the process.
    static let firstSignal = Mutex<(@Sendable () -> Void)?>(nil)

    /// Installs the handlers; call once, early in `main`.
    static func install() {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { return }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)
        interruptPipe = fds[1]
        let reader = fds[0]
        _ = startThread {
            var signalNumber: UInt8 = 0
            while read(reader, &signalNumber, 1) != 1 {}
            let first = firstSignal.withLock { f in
                defer { f = nil }
                return f
            }
            if let first {
                first()
                while read(reader, &signalNumber, 1) != 1 {}
            }
            TemporaryFiles.removeAll()
            let text = message.withLock { $0 }(ProcessCounters.packBytesStored.load(ordering: .relaxed))
            printError("cabackup: " + text)
            _exit(130)
        }
        signal(SIGINT, onSignal)
        signal(SIGTERM, onSignal)
        // A parent may have left them blocked (some process launchers do): threads started
        // from here on inherit this mask.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }
}

/// The write end of the interrupt pipe (set once, before the handlers are installed).
nonisolated(unsafe) private var interruptPipe: Int32 = -1

/// The handler: async-signal-safe, it only writes to the pipe.
private func onSignal(_ signalNumber: Int32) {
    var byte = UInt8(truncatingIfNeeded: signalNumber)
    _ = write(interruptPipe, &byte, 1)
}
