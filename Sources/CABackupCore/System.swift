import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// Thin wrappers over POSIX calls. Paths are byte arrays (file names need not be UTF-8);
/// every failure becomes a ``CABackupError/io(operation:path:errno:)``.

package func errnoDescription(_ e: Int32) -> String {
    String(cString: strerror(e))
}

/// Readable form of a byte path for messages: invalid UTF-8 is escaped as `\xNN`.
public func displayPath(_ bytes: some Collection<UInt8>) -> String {
    var out = ""
    var it = Array(bytes)[...]
    while !it.isEmpty {
        // Decode the longest valid UTF-8 prefix scalar by scalar.
        var decoder = UTF8()
        var iter = it.makeIterator()
        switch decoder.decode(&iter) {
        case .scalarValue(let s):
            let len = String(s).utf8.count
            if s == "\\" {
                out += "\\\\"
            } else if s.value < 0x20 || s.value == 0x7F {
                out += "\\x" + hexString([UInt8(s.value)])
            } else {
                out.unicodeScalars.append(s)
            }
            it = it.dropFirst(len)
        case .error, .emptyInput:
            out += "\\x" + hexString([it.first!])
            it = it.dropFirst()
        }
    }
    return out
}

@inline(__always)
package func withCPath<R>(_ path: [UInt8], _ body: (UnsafePointer<CChar>) throws -> R) rethrows -> R {
    var z = path
    z.append(0)
    return try z.withUnsafeBufferPointer {
        try $0.baseAddress!.withMemoryRebound(to: CChar.self, capacity: z.count, body)
    }
}

package func ioError(_ op: String, _ path: [UInt8], _ e: Int32 = errno) -> CABackupError {
    .io(operation: op, path: displayPath(path), errno: e)
}

package func ioError(_ op: String, _ path: String, _ e: Int32 = errno) -> CABackupError {
    .io(operation: op, path: path, errno: e)
}

/// `lstat` of a path.
func lstatPath(_ path: [UInt8]) throws -> stat {
    var st = stat()
    let rc = withCPath(path) { lstat($0, &st) }
    if rc != 0 { throw ioError("lstat", path) }
    return st
}

/// Names in a directory (without `.` and `..`), sorted bytewise.
package func readDirectory(_ path: [UInt8]) throws -> [[UInt8]] {
    guard let dir = withCPath(path, { opendir($0) }) else { throw ioError("open directory", path) }
    return try readDirectory(dir, path: path)
}

/// The names in the open directory `fd` (not closed), sorted bytewise; `path` is for errors.
package func readDirectory(fd: Int32, path: [UInt8]) throws -> [[UInt8]] {
    let copy = dup(fd)
    guard copy >= 0, let dir = fdopendir(copy) else {
        if copy >= 0 { close(copy) }
        throw ioError("open directory", path)
    }
    return try readDirectory(dir, path: path)
}

private func readDirectory(_ dir: OpaquePointer, path: [UInt8]) throws -> [[UInt8]] {
    defer { closedir(dir) }
    var names: [[UInt8]] = []
    while true {
        errno = 0
        guard let ent = readdir(dir) else {
            if errno != 0 { throw ioError("read directory", path) }
            break
        }
        let name = withUnsafeBytes(of: ent.pointee.d_name) { raw -> [UInt8] in
            let len = strnlen(raw.baseAddress!.assumingMemoryBound(to: CChar.self), raw.count)
            return Array(raw.prefix(len))
        }
        if name == [0x2E] || name == [0x2E, 0x2E] { continue }
        names.append(name)
    }
    names.sort { $0.lexicographicallyPrecedes($1) }
    return names
}

/// Appends a name to a directory path with one `/`.
package func joinPath(_ dir: [UInt8], _ name: [UInt8]) -> [UInt8] {
    var p = dir
    if p.last != UInt8(ascii: "/") { p.append(UInt8(ascii: "/")) }
    p.append(contentsOf: name)
    return p
}

/// Writes all of `buf` to `fd`, retrying short writes and EINTR.
package func writeAll(_ fd: Int32, _ buf: UnsafeRawBufferPointer, path: String) throws {
    var done = 0
    while done < buf.count {
        let n = write(fd, buf.baseAddress! + done, buf.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            throw ioError("write", path)
        }
        done += n
    }
}

/// Writes all of `buf` at `offset`, retrying short writes and EINTR.
package func pwriteAll(_ fd: Int32, _ buf: UnsafeRawBufferPointer, offset: Int64, path: String) throws {
    var done = 0
    while done < buf.count {
        let n = pwrite(fd, buf.baseAddress! + done, buf.count - done, off_t(offset) + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            throw ioError("write", path)
        }
        done += n
    }
}

/// Reads up to `count` bytes at the current position, retrying EINTR and short reads
/// until `count` bytes or end of file. Returns the number of bytes read.
package func readFully(_ fd: Int32, into buf: UnsafeMutableRawPointer, count: Int, path: [UInt8]) throws -> Int {
    var done = 0
    while done < count {
        let n = read(fd, buf + done, count - done)
        if n < 0 {
            let err = errno
            if err == EINTR { continue }
            // Files are opened O_NONBLOCK (so a FIFO swapped in cannot hang the open);
            // regular files ignore it, but a network or FUSE file system may not.
            if err == EAGAIN {
                let flags = fcntl(fd, F_GETFL)
                if flags >= 0, flags & O_NONBLOCK != 0, fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) == 0 { continue }
            }
            errno = err
            throw ioError("read", path)
        }
        if n == 0 { break }
        done += n
    }
    return done
}

/// Reads exactly `count` bytes at `offset`; throws when the file is shorter.
package func preadFully(
    _ fd: Int32, into buf: UnsafeMutableRawPointer, count: Int, offset: Int64, path: String
)
    throws
{
    var done = 0
    while done < count {
        let n = pread(fd, buf + done, count - done, off_t(offset) + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            throw ioError("read", path)
        }
        if n == 0 { throw CABackupError.corrupt(what: path, reason: "file ends early") }
        done += n
    }
}

/// fsync a directory so a rename inside it is durable.
package func fsyncDirectory(_ path: String) throws {
    let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd < 0 { throw ioError("open directory", path) }
    defer { close(fd) }
    if fsync(fd) != 0 && errno != EINVAL { throw ioError("fsync", path) }
}

/// Creates a directory and its parents (like `mkdir -p`).
package func makeDirectories(_ path: String, mode: mode_t = 0o700) throws {
    var current = path.hasPrefix("/") ? "" : "."
    for comp in path.split(separator: "/") {
        current += "/" + comp
        if mkdir(current, mode) != 0 && errno != EEXIST { throw ioError("create directory", current) }
    }
}

/// Writes a file durably and atomically: `fill` writes a temp file in the same
/// directory, then fsync, rename over `path`, fsync the directory.
package func writeFileAtomically(
    _ path: String, mode: mode_t = 0o600, durable: Bool = true, fill: (_ fd: Int32, _ tmp: String) throws -> Void
)
    throws
{
    let dir = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
    let tmp = path + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
    if fd < 0 { throw ioError("create", tmp) }
    do {
        try fill(fd, tmp)
        if durable && fsync(fd) != 0 { throw ioError("fsync", tmp) }
    } catch {
        close(fd)
        unlink(tmp)
        throw error
    }
    close(fd)
    if rename(tmp, path) != 0 {
        let e = errno
        unlink(tmp)
        throw ioError("rename", path, e)
    }
    if durable { try fsyncDirectory(dir.isEmpty ? "." : dir) }
}

package func writeFileAtomically(
    _ path: String, _ bytes: UnsafeRawBufferPointer, mode: mode_t = 0o600, durable: Bool = true
)
    throws
{
    try writeFileAtomically(path, mode: mode, durable: durable) { fd, tmp in try writeAll(fd, bytes, path: tmp) }
}

package func writeFileAtomically(
    _ path: String, _ bytes: [UInt8], mode: mode_t = 0o600, durable: Bool = true
)
    throws
{
    try bytes.withUnsafeBytes { (raw) throws in
        try writeFileAtomically(path, raw, mode: mode, durable: durable)
    }
}

/// A file's size, or `nil` when there is none.
package func fileSize(_ path: String) throws -> Int64? {
    var st = stat()
    if stat(path, &st) != 0 {
        if errno == ENOENT { return nil }
        throw ioError("stat", path)
    }
    return Int64(st.st_size)
}

/// Copies a file to `path` atomically and durably, a MiB at a time.
package func copyFileAtomically(from source: String, to path: String, durable: Bool) throws {
    let input = open(source, O_RDONLY | O_CLOEXEC)
    if input < 0 { throw ioError("open", source) }
    defer { close(input) }
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)
    defer { buffer.deallocate() }
    try writeFileAtomically(path, durable: durable) { output, tmp in
        while true {
            let n = try readFully(input, into: buffer.baseAddress!, count: buffer.count, path: Array(source.utf8))
            if n == 0 { break }
            try writeAll(output, UnsafeRawBufferPointer(rebasing: buffer[..<n]), path: tmp)
        }
    }
}

/// Reads a whole small file (config, snapshot record).
package func readSmallFile(_ path: String, limit: Int = 64 << 20) throws -> [UInt8] {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    if fd < 0 { throw ioError("open", path) }
    defer { close(fd) }
    var st = stat()
    if fstat(fd, &st) != 0 { throw ioError("stat", path) }
    let size = Int(st.st_size)
    if size > limit { throw CABackupError.corrupt(what: path, reason: "\(size) bytes is larger than expected") }
    var out = [UInt8](repeating: 0, count: size)
    let n = try out.withUnsafeMutableBytes { (raw) throws in
        try readFully(
            fd, into: raw.baseAddress ?? UnsafeMutableRawPointer(bitPattern: 1)!, count: size, path: Array(path.utf8))
    }
    out.removeSubrange(n...)
    return out
}

package func fileExists(_ path: String) -> Bool {
    var st = stat()
    return lstat(path, &st) == 0
}

package func isDirectory(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
}

/// The host name, as recorded in snapshots.
public func currentHostname() -> String {
    var buf = [CChar](repeating: 0, count: 256)
    gethostname(&buf, 255)
    return buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
}

/// Nanoseconds since the epoch from a `timespec`.
@inline(__always)
package func nanoseconds(_ ts: timespec) -> Int64 {
    Int64(ts.tv_sec) &* 1_000_000_000 &+ Int64(ts.tv_nsec)
}

@inline(__always)
package func timespecFrom(ns: Int64) -> timespec {
    var sec = ns / 1_000_000_000
    var nsec = ns % 1_000_000_000
    if nsec < 0 {
        nsec += 1_000_000_000
        sec -= 1
    }
    return timespec(tv_sec: Int(sec), tv_nsec: Int(nsec))
}

/// Monotonic seconds, for durations and progress rates.
package func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Monotonic nanoseconds, for cheap elapsed-time checks on hot paths.
package func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}

/// The number of CPUs this process may use, for sizing worker pools: the online CPUs,
/// limited by the affinity mask (`taskset`, cpusets) and by the cgroup CPU quota
/// (`cpu.max` in cgroup v2, `cpu.cfs_quota_us` in v1, on the process's cgroup and its
/// ancestors), rounded up; at least 1. A container limited to 2 CPUs on a 64-core host
/// gets 2 workers, not 64.
package func usableCPUCount() -> Int {
    var count = max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    #if os(Linux)
        // The calling thread's affinity mask, as the kernel lists it (Glibc's module does
        // not export sched_getaffinity).
        if let status = try? readSmallFile("/proc/thread-self/status", limit: 1 << 20) {
            for line in String(decoding: status, as: UTF8.self).split(separator: "\n")
            where line.hasPrefix("Cpus_allowed_list:") {
                if let n = parseCPUList(String(line.dropFirst("Cpus_allowed_list:".count))), n > 0 {
                    count = min(count, n)
                }
            }
        }
        if let quota = cgroupCPULimit() { count = min(count, quota) }
    #endif
    return max(1, count)
}

/// The smallest CPU quota, in whole CPUs rounded up, on the cgroup of this process and its
/// ancestors; `nil` when none is set or the files cannot be read.
func cgroupCPULimit() -> Int? {
    guard let text = try? readSmallFile("/proc/self/cgroup", limit: 64 << 10) else { return nil }
    var limit: Int?
    func consider(_ cpus: Int?) {
        if let cpus { limit = min(limit ?? cpus, cpus) }
    }
    for line in String(decoding: text, as: UTF8.self).split(separator: "\n") {
        // "hierarchy-ID:controllers:path"; v2 is "0::/path", v1 lists "cpu" among controllers.
        let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
        guard fields.count == 3 else { continue }
        let controllers = fields[1].split(separator: ",")
        let isV2 = fields[0] == "0" && fields[1].isEmpty
        guard isV2 || controllers.contains("cpu") else { continue }
        var path = String(fields[2])
        while true {
            let dir = isV2 ? "/sys/fs/cgroup" + path : "/sys/fs/cgroup/cpu" + path
            if isV2 {
                if let s = try? readSmallFile(dir + "/cpu.max", limit: 256) {
                    consider(parseCPUMax(String(decoding: s, as: UTF8.self)))
                }
            } else if let q = try? readSmallFile(dir + "/cpu.cfs_quota_us", limit: 256),
                let p = try? readSmallFile(dir + "/cpu.cfs_period_us", limit: 256)
            {
                consider(parseCPUMax(String(decoding: q, as: UTF8.self) + " " + String(decoding: p, as: UTF8.self)))
            }
            if path == "/" || path.isEmpty { break }
            path = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
            if path.isEmpty { path = "/" }
        }
    }
    return limit
}

/// The number of CPUs in a kernel CPU list such as "0-3,8,10-11"; `nil` when malformed.
func parseCPUList(_ text: String) -> Int? {
    var count = 0
    for part in text.split(separator: ",") {
        let bounds = part.filter { !$0.isWhitespace }.split(separator: "-", omittingEmptySubsequences: false)
        guard let low = bounds.first.flatMap({ Int($0) }), bounds.count <= 2 else { return nil }
        let high = bounds.count == 2 ? Int(bounds[1]) : low
        guard let high, high >= low else { return nil }
        count += high - low + 1
    }
    return count > 0 ? count : nil
}

/// Whole CPUs (rounded up) from a quota and a period, as `cpu.max` writes them
/// ("200000 100000"); `nil` for no limit ("max 100000", a negative v1 quota) or garbage.
func parseCPUMax(_ text: String) -> Int? {
    let parts = text.split(whereSeparator: { $0 == " " || $0 == "\n" })
    guard parts.count >= 2, let quota = Int64(parts[0]), let period = Int64(parts[1]), quota > 0, period > 0 else {
        return nil
    }
    return Int(min((quota + period - 1) / period, 1 << 20))
}

/// Where a repository on a storage without a working directory keeps its index and the
/// packs being built:
/// `$XDG_CACHE_HOME/cabackup/<key>/` (else `~/.cache/cabackup/<key>/`).
package func cacheDirectory(_ key: String) -> String {
    let env = ProcessInfo.processInfo.environment
    let base: String
    if let x = env["XDG_CACHE_HOME"], !x.isEmpty {
        base = x + "/cabackup"
    } else {
        base = (env["HOME"] ?? "/root") + "/.cache/cabackup"
    }
    return base + "/" + key
}

/// This user's cabackup settings: `$XDG_CONFIG_HOME/cabackup` (else `~/.config/cabackup`),
/// where tokens and the configs of known repositories are kept.
package func configDirectory() -> String {
    let env = ProcessInfo.processInfo.environment
    if let x = env["XDG_CONFIG_HOME"], !x.isEmpty { return x + "/cabackup" }
    return (env["HOME"] ?? "/root") + "/.config/cabackup"
}

/// The scheme a repository location starts with, by restic's rule: `[a-z0-9]+:` followed
/// by more (`http://…`, `s3:…`, `sftp:host:/x`, `b2:bucket`); nil for a local path.
package func locationScheme(_ s: String) -> Substring? {
    guard let colon = s.firstIndex(of: ":"), colon > s.startIndex, s.index(after: colon) < s.endIndex else {
        return nil
    }
    let scheme = s[..<colon]
    return scheme.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) } ? scheme : nil
}

package func wallClockNs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return nanoseconds(ts)
}

package func currentUsername() -> String {
    if let pw = getpwuid(getuid()), let name = pw.pointee.pw_name { return String(cString: name) }
    return String(getuid())
}

/// Makes a path absolute against the working directory and removes `.`/`..` and
/// repeated slashes lexically.
public func absolutePath(_ path: String) -> String {
    var p = path
    if !p.hasPrefix("/") {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        if getcwd(&buf, buf.count) != nil {
            p = buf.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } + "/" + p
        }
    }
    var parts: [Substring] = []
    for c in p.split(separator: "/") {
        if c == "." { continue }
        if c == ".." {
            if !parts.isEmpty { parts.removeLast() }
            continue
        }
        parts.append(c)
    }
    return "/" + parts.joined(separator: "/")
}

/// Raises the soft limit on open descriptors to the hard one and returns it (at most
/// 2²⁰), or nil when it cannot be read.
package func raiseDescriptorLimit() -> Int? {
    var limit = rlimit()
    guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return nil }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    }
    return Int(min(limit.rlim_cur, 1 << 20))
}

/// `90s`, `15m`, `24h`, `7d` or plain seconds, in seconds; nil for anything else (`watch
/// --every` and the `every` of a repository in the device configuration).
package func parseDuration(_ s: String) -> Double? {
    let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86400]
    if let last = s.last, let unit = units[last], let v = Double(s.dropLast()), v > 0 { return v * unit }
    if let v = Double(s), v > 0 { return v }
    return nil
}
