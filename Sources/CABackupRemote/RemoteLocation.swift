import CABackup
import Foundation

/// A repository on a `cabackup server`: `http://NAME@HOST:PORT[/PREFIX]` (https with TLS).
///
/// NAME is the account; the space addressed is always the one of the account whose token
/// is sent, so a URL cannot name another user's data.
public struct RemoteLocation: Sendable, Equatable, CustomStringConvertible {
    /// `http` or `https`.
    public var scheme: String
    /// The account name.
    public var user: String
    public var host: String
    public var port: Int
    /// A path prefix for a server behind a reverse proxy (`""` or `/PREFIX`, no trailing slash).
    public var prefix: String

    /// The server's base URL, without the user: `http://HOST:PORT/PREFIX`.
    public var serverURL: String { "\(scheme)://\(hostPort)\(prefix)" }

    var hostPort: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    public var description: String { "\(scheme)://\(user)@\(hostPort)\(prefix)" }

    /// `scheme://host:port` as the user gave it (the port always written): what a login
    /// secret is bound to, so one captured by another server is useless here.
    public var origin: String { "\(scheme)://\(hostPort.lowercased())" }

    /// Whether a secret sent here could be read on the way: plain `http://` to anything
    /// but this machine (`127.0.0.0/8`, `::1`, `localhost`).
    public var sendsSecretsInClear: Bool {
        guard scheme == "http" else { return false }
        let h = host.lowercased()
        return !(h == "localhost" || h == "::1" || h.hasPrefix("127."))
    }

    /// Whether `s` is meant as a server location (its scheme is `http` or `https`).
    public static func isRemote(_ s: String) -> Bool { scheme(of: s).map { $0 == "http" || $0 == "https" } ?? false }

    /// The scheme `s` starts with, by restic's rule: `[a-z0-9]+:` followed by more
    /// (`http://…`, `s3:…`, `sftp:host:/x`, `b2:bucket`); nil for a local path. A local
    /// path with a colon in its first component is written `./name:x` or absolute.
    public static func scheme(of s: String) -> Substring? {
        guard let colon = s.firstIndex(of: ":"), colon > s.startIndex, s.index(after: colon) < s.endIndex else {
            return nil
        }
        let scheme = s[..<colon]
        return scheme.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) } ? scheme : nil
    }

    /// Parses `http(s)://NAME@HOST[:PORT][/PREFIX]`; `requireUser` is false for the
    /// `--server URL` of `register` and `login`, which name the user separately.
    public init(parsing s: String, requireUser: Bool = true) throws {
        guard let url = URLComponents(string: s), let scheme = url.scheme, scheme == "http" || scheme == "https",
            let host = url.host, !host.isEmpty
        else {
            throw CABackupError.invalidArgument(
                "'\(s)' is not a server location: use http://NAME@HOST:PORT or https://NAME@HOST:PORT")
        }
        let user = url.user ?? ""
        if requireUser || !user.isEmpty {
            guard isValidUserName(user) else {
                throw CABackupError.invalidArgument(
                    "'\(s)' does not name a valid account: use http://NAME@HOST:PORT with NAME of 1-64 characters a-z 0-9 . _ -"
                )
            }
        }
        guard url.password == nil else {
            throw CABackupError.invalidArgument(
                "do not put a password in the URL '\(s)': use CABACKUP_PASSWORD or a prompt")
        }
        var prefix = url.path
        while prefix.hasSuffix("/") { prefix.removeLast() }
        self.scheme = scheme
        self.user = user
        // An IPv6 literal without its brackets (``hostPort`` adds them back).
        self.host = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        self.port = url.port ?? (scheme == "https" ? 443 : 80)
        self.prefix = prefix
    }
}

/// The login secret of scheme 1, for servers and accounts that predate scheme 2: scrypt
/// of the password salted with the account name only, so it is the same on every server
/// where the name and password are. A client that has seen scheme 2 at a server never
/// sends it there again.
public func legacyLoginSecret(password: String, user: String) throws -> String {
    let salt = Array("cabackup login secret v1\u{0}".utf8) + Array(user.utf8)
    return hexString(try scrypt(password: Array(password.utf8), salt: salt, n: 1 << 15, r: 8, p: 1, length: 32))
}

/// The secret a client sends to log in (scheme 2): scrypt of the password with a salt made
/// of a fixed context string, the server's origin as the user gave it (`scheme://host:port`),
/// the account name and the server's per-account salt. A secret captured by one server, or
/// on a plain `http://` path, logs in nowhere else. Repository key slots use random salts and
/// another context, so the server never receives anything a repository key can be derived
/// from, even when the account and repository passwords are the same string.
public func loginSecret(password: String, user: String, origin: String, serverSalt: [UInt8]) throws -> String {
    let salt =
        Array("cabackup login secret v2\u{0}".utf8) + Array(origin.utf8) + [0] + Array(user.utf8) + [0] + serverSalt
    return hexString(try scrypt(password: Array(password.utf8), salt: salt, n: 1 << 15, r: 8, p: 1, length: 32))
}

/// The origins this device has seen speak login scheme 2, in `login-schemes.json` beside
/// the credentials: to them it never sends a scheme-1 secret, even if one later says it
/// does not know scheme 2.
enum LoginSchemes {
    static var path: String { CredentialStore.directory + "/login-schemes.json" }

    static func knowsScheme2(_ origin: String) -> Bool {
        guard let bytes = try? readSmallFile(path, limit: 1 << 20),
            let all = try? JSONDecoder().decode([String: Int].self, from: Data(bytes))
        else { return false }
        return (all[origin] ?? 1) >= 2
    }

    static func remember(_ origin: String) throws {
        var all: [String: Int] = [:]
        if let bytes = try? readSmallFile(path, limit: 1 << 20),
            let stored = try? JSONDecoder().decode([String: Int].self, from: Data(bytes))
        {
            all = stored
        }
        guard all[origin] != 2 else { return }
        all[origin] = 2
        try makeDirectories(CredentialStore.directory)
        try writeFileAtomically(path, jsonFile(all), mode: 0o600, durable: true)
    }
}

/// Tokens of the accounts this user logged in to, in `$XDG_CONFIG_HOME/cabackup/credentials.json`
/// (else `~/.config/cabackup/`), mode 0600. Keyed by server URL, then account name.
public enum CredentialStore {
    struct Entry: Codable {
        var token: String
        var device: String
    }

    /// The directory holding the file.
    public static var directory: String { configDirectory() }

    static var path: String { directory + "/credentials.json" }

    static func load() -> [String: [String: Entry]] {
        guard let bytes = try? readSmallFile(path) else { return [:] }
        return (try? JSONDecoder().decode([String: [String: Entry]].self, from: Data(bytes))) ?? [:]
    }

    static func save(_ all: [String: [String: Entry]]) throws {
        try makeDirectories(directory)
        let bytes = jsonFile(all)
        try bytes.withUnsafeBytes { try writeFileAtomically(path, $0, mode: 0o600, durable: true) }
    }

    /// The stored token for an account, if logged in.
    public static func token(server: String, user: String) -> String? { load()[server]?[user]?.token }

    /// Stores (or replaces) a token.
    public static func store(server: String, user: String, token: String, device: String) throws {
        var all = load()
        all[server, default: [:]][user] = Entry(token: token, device: device)
        try save(all)
    }

    /// Forgets a token.
    public static func remove(server: String, user: String) throws {
        var all = load()
        all[server]?[user] = nil
        if all[server]?.isEmpty == true { all[server] = nil }
        try save(all)
    }
}
