import ArgumentParser
import CABackup

#if canImport(Glibc)
    import Glibc
#endif

/// Where a password comes from: `--password-file`, then the environment variable, then a
/// no-echo prompt on the terminal. Without any of them, the command fails with exit 12
/// instead of waiting for input that will never come.
struct PasswordSource {
    var file: String?
    var environmentVariable = "CABACKUP_PASSWORD"
    var prompt = "enter password for repository: "

    /// The password given without asking: the file, else the environment variable.
    private func given() throws -> String? {
        if let file { return try readPasswordFile(file) }
        if let env = getenv(environmentVariable), env.pointee != 0 { return String(cString: env) }
        return nil
    }

    /// The password of an existing repository.
    func read(for location: String) throws -> String {
        if let p = try given() { return p }
        guard let p = promptNoEcho(prompt) else { throw CABackupError.passwordRequired(location) }
        return p
    }

    /// A new password: asked twice on a terminal, and refused at once when too short.
    func readNew(for location: String) throws -> String {
        if let p = try given() {
            try checkNewPassword(p)
            return p
        }
        guard let first = promptNoEcho("enter new password: ") else {
            throw ValidationError(
                "a new password is needed: set \(environmentVariable), pass a password file, or run on a terminal")
        }
        try checkNewPassword(first)
        guard let second = promptNoEcho("enter the new password again: "), second == first else {
            throw ValidationError("the passwords do not match: nothing was changed")
        }
        return first
    }
}

/// The first line of a file (restic's convention: the trailing newline is not part of it).
func readPasswordFile(_ path: String) throws -> String {
    guard let f = fopen(path, "r") else {
        throw ValidationError("cannot read password file \(path): \(String(cString: strerror(errno)))")
    }
    defer { fclose(f) }
    var bytes: [UInt8] = []
    while true {
        let c = fgetc(f)
        if c == EOF || c == 0x0A { break }
        bytes.append(UInt8(truncatingIfNeeded: c))
        if bytes.count > 4096 { throw ValidationError("password file \(path) is longer than 4096 bytes") }
    }
    if bytes.last == 0x0D { bytes.removeLast() }
    guard !bytes.isEmpty else { throw ValidationError("password file \(path) is empty") }
    return String(decoding: bytes, as: UTF8.self)
}

/// Reads a line from the controlling terminal with echo off, or nil without a terminal.
func promptNoEcho(_ prompt: String) -> String? {
    let fd = open("/dev/tty", O_RDWR | O_CLOEXEC)
    if fd < 0 { return nil }
    defer { close(fd) }
    var saved = termios()
    guard tcgetattr(fd, &saved) == 0 else { return nil }
    var quiet = saved
    quiet.c_lflag &= ~tcflag_t(ECHO)
    _ = prompt.withCString { write(fd, $0, strlen($0)) }
    tcsetattr(fd, TCSAFLUSH, &quiet)
    defer {
        tcsetattr(fd, TCSAFLUSH, &saved)
        _ = write(fd, "\n", 1)
    }
    var bytes: [UInt8] = []
    var c: UInt8 = 0
    while read(fd, &c, 1) == 1 && c != 0x0A && c != 0x0D {
        bytes.append(c)
        if bytes.count > 4096 { return nil }
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// scrypt cost for new key slots. In builds with the test hooks compiled in (debug builds,
/// see `Package.swift`), `CABACKUP_TEST_INSECURE_KDF=1` makes key slots cheap to open for
/// test suites; a release build has no such switch.
var kdfForNewKeys: KDFParameters {
    #if CABACKUP_TEST_HOOKS
        if let s = getenv("CABACKUP_TEST_INSECURE_KDF"), String(cString: s) == "1" { return .insecureFastForTesting }
    #endif
    return .default
}
