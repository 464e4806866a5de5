import AsyncHTTPClient
import CABackup
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization

/// Blocking HTTP calls to a `cabackup server`, for the engine's worker threads (never
/// called from an event loop). One AsyncHTTPClient per trust configuration is shared by
/// the whole process, so connections are pooled and kept alive across calls.
final class RemoteClient: Sendable {
    let server: String
    let user: String
    /// The token sent, if any; replaced when ``followsStore`` and the store has a newer one.
    private let token: Mutex<String?>
    /// Whether the token came from ``CredentialStore``: a call the server refuses with 401
    /// then takes the stored token again, once, when another login of this device replaced it.
    let followsStore: Bool
    private let client: HTTPClient

    /// - Parameters:
    ///   - caCertificate: a PEM file to trust in addition to the system's roots (a
    ///     self-signed server certificate); default `$CABACKUP_CACERT`.
    ///   - followsStore: the token is the one ``CredentialStore`` holds (see ``followsStore``).
    init(server: String, user: String, token: String?, caCertificate: String? = nil, followsStore: Bool = false) throws
    {
        self.server = server
        self.user = user
        self.token = Mutex(token)
        self.followsStore = followsStore
        let ca = caCertificate ?? ProcessInfo.processInfo.environment["CABACKUP_CACERT"] ?? ""
        client = try SharedHTTPClient.client(caCertificate: ca, readTimeout: .seconds(120))
    }

    struct Reply {
        var status: Int
        var headers: HTTPHeaders
        /// The body as received (ranged reads copy from it straight to their destination).
        var buffer: ByteBuffer
        /// The body as bytes, for small answers.
        var body: [UInt8] { Array(buffer.readableBytesView) }
    }

    /// The default cap on an answer's body: JSON replies (tokens, device lists, lock ids).
    static let smallReply = 1 << 20

    /// When the server last answered a call of this client (see ``RetryPolicy``).
    private let lastAnswer = LastAnswer()

    /// Sends one request; statuses in `accept` are returned, every other status and every
    /// transport error becomes a one-line `CABackupError`. An answer whose body is longer
    /// than `limit` (what the call can legitimately get back) is refused as soon as its
    /// length is announced or reached, so a hostile server cannot make the client buffer
    /// more than that.
    ///
    /// Transport failures and 5xx answers are retried as ``RetryPolicy`` says. A call
    /// that is not `idempotent` (default: every method but POST) is retried after a
    /// transport failure only when it cannot have reached the server (no connection).
    func call(
        _ method: HTTPMethod, _ path: String, headers extra: [(String, String)] = [], body: [UInt8]? = nil,
        buffer: ByteBuffer? = nil,
        accept: Set<Int> = [200], limit: Int = smallReply, idempotent: Bool? = nil
    ) throws -> Reply {
        let url = server + path
        var headers = HTTPHeaders()
        let sent = token.withLock { $0 }
        if let sent { headers.add(name: "Authorization", value: "Bearer " + sent) }
        for (k, v) in extra { headers.add(name: k, value: v) }
        var request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(
                url: url, method: method, headers: headers,
                body: buffer.map { .byteBuffer($0) } ?? body.map { .bytes($0) })
        } catch {
            throw CABackupError.invalidArgument("'\(url)' is not a usable URL: \(error)")
        }
        let retriable = idempotent ?? (method != .POST)
        var attempt = 1
        var tokenRenewed = false
        while true {
            let response: HTTPClient.Response
            do {
                let accumulator = ResponseAccumulator(request: request, maxBodySize: limit)
                response = try client.execute(
                    request: request, delegate: accumulator, deadline: .now() + .seconds(600)
                ).wait()
            } catch is ResponseAccumulator.ResponseTooBigError {
                throw CABackupError.untrusted(
                    "the server at \(server) answered \(method) \(path) with a body larger than \(limit) bytes, more than that call can legitimately return: the server may be hostile; nothing was changed"
                )
            } catch {
                let reason = describe(error)
                guard retriable || isConnectFailure(error),
                    RetryPolicy.retriesTransport(attempt: attempt, lastAnswer: lastAnswer)
                else {
                    throw CABackupError.network(
                        "cannot reach the server at \(server) (\(reason)): check the address, and that 'cabackup server' is running; nothing was lost, run the command again"
                    )
                }
                let wait = RetryPolicy.backoff(attempt: attempt)
                if lastAnswer.answered {  // an outage, not a wrong address: say why nothing moves
                    NetworkWaits.report("waiting for the network: \(server) does not answer (\(reason)); retrying")
                }
                Thread.sleep(forTimeInterval: wait)
                attempt += 1
                continue
            }
            lastAnswer.record()
            let received = response.body ?? ByteBuffer()
            let status = Int(response.status.code)
            if accept.contains(status) { return Reply(status: status, headers: response.headers, buffer: received) }
            // Refused, and this device logged in again meanwhile (cabackup ui, or login in
            // another terminal, while this process runs): the new token, once.
            if status == 401, followsStore, !tokenRenewed,
                let stored = CredentialStore.token(server: server, user: user), stored != sent
            {
                token.withLock { $0 = stored }
                request.headers.replaceOrAdd(name: "Authorization", value: "Bearer " + stored)
                tokenRenewed = true
                continue
            }
            // Busy (too many uploads to the space at once): wait as long as the server
            // asks, at most 30 s a time, and try again, up to 20 times.
            if status == 503, attempt <= 20 {
                let seconds = response.headers.first(name: "Retry-After").flatMap { UInt32($0) } ?? 1
                Thread.sleep(forTimeInterval: Double(min(max(seconds, 1), 30)))
                attempt += 1
                continue
            }
            // A failing server or a gateway without one behind it: a few tries with back-off.
            if [500, 502, 504].contains(status), retriable, attempt < RetryPolicy.fewAttempts {
                Thread.sleep(forTimeInterval: RetryPolicy.backoff(attempt: attempt))
                attempt += 1
                continue
            }
            throw Self.error(status: status, body: Array(received.readableBytesView), server: server, user: user)
        }
    }

    /// The server's reason in an error answer (`{"error": "…"}`), else `HTTP <status>`.
    static func message(status: Int, body: [UInt8]) -> String {
        struct Message: Decodable { let error: String }
        return (try? JSONDecoder().decode(Message.self, from: Data(body)))?.error ?? "HTTP \(status)"
    }

    /// The one-line error for a status the caller did not expect.
    static func error(status: Int, body: [UInt8], server: String, user: String) -> CABackupError {
        let message = Self.message(status: status, body: body)
        switch status {
        case 401:
            return .notLoggedIn(
                "the server at \(server) did not accept the login of '\(user)' (\(message)): run 'cabackup login --server \(server) --user \(user)'"
            )
        case 403:
            return .remote(status: status, message: "\(message): this device's token may not do that")
        case 413:
            return .remote(
                status: status,
                message: "\(message): free space in the account (forget and prune) or ask for a larger quota")
        case 429:
            return .remote(status: status, message: message)
        case 500...:
            return .remote(
                status: status,
                message: "the server at \(server) failed (\(message)): try again later; the space stays valid")
        default:
            return .remote(status: status, message: message)
        }
    }
}

/// Whether a transport error happened before a request could be sent (no connection), so
/// even a call that is not idempotent may be retried.
private func isConnectFailure(_ error: any Error) -> Bool {
    if let e = error as? HTTPClientError, e == .connectTimeout { return true }
    if let io = error as? IOError, io.errnoCode == ECONNREFUSED { return true }
    let s = "\(error)"
    return s.contains("connectTimeout") || s.contains("Connection refused") || s.contains("connectionRefused")
}

/// A transport error in a few words, to stand in parentheses: a system error by its
/// errno text alone (NIO's own description has an unmatched parenthesis), anything else
/// cut to 120 characters with unbalanced parentheses removed.
private func describe(_ error: any Error) -> String {
    if let io = error as? IOError { return errnoDescription(io.errnoCode) }
    let s = "\(error)"
    if s.contains("CERTIFICATE_VERIFY_FAILED") || s.contains("handshakeFailed") {
        return
            "TLS handshake failed: the server's certificate is not trusted; for a self-signed one pass --cacert FILE or set CABACKUP_CACERT"
    }
    if let e = error as? HTTPClientError {
        switch e {
        case .connectTimeout: return "connecting timed out"
        case .readTimeout: return "the server stopped answering"
        case .remoteConnectionClosed: return "the server closed the connection"
        default: break
        }
    }
    var text = s.count > 120 ? String(s.prefix(120)) + "…" : s
    // Drop each ')' that closes nothing, then each '(' left open.
    var open: [String.Index] = []
    var unmatched: [String.Index] = []
    for i in text.indices {
        if text[i] == "(" { open.append(i) }
        if text[i] == ")" {
            if open.popLast() == nil { unmatched.append(i) }
        }
    }
    for i in (unmatched + open).sorted(by: >) { text.remove(at: i) }
    return text
}

/// What `cabackup devices` shows about one login.
public struct DeviceInfo: Sendable, Codable, Equatable {
    /// A short public id of the token (not the token).
    public let id: String
    public let device: String
    public let created: String
    public let lastUsed: String
    /// Whether this is the token the request was made with.
    public let current: Bool
    /// `full`, or `append-only` for a token that may read, add and lock but never delete.
    public let rights: String

    enum CodingKeys: String, CodingKey {
        case id, device, created, current, rights
        case lastUsed = "last_used"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        id = try c.decode(String.self, forKey: .id)
        device = try c.decode(String.self, forKey: .device)
        created = try c.decode(String.self, forKey: .created)
        lastUsed = try c.decode(String.self, forKey: .lastUsed)
        current = try c.decode(Bool.self, forKey: .current)
        rights = try c.decodeIfPresent(String.self, forKey: .rights) ?? "full"
    }
}

/// The storage a space uses against its quota.
public struct SpaceUsage: Sendable, Codable, Equatable {
    /// Bytes the space holds (packs, records, key slots, config).
    public let used: Int64
    /// The most it may hold, or nil for no quota.
    public let quota: Int64?
}

/// Accounts on a `cabackup server`: register, log in and out, list and revoke devices.
/// Only a login secret derived from the password
/// (``loginSecret(password:user:origin:serverSalt:)``) is ever sent.
public enum RemoteAccount {
    /// The secret to send to `location`'s server for `user`, and the scheme it is of: scheme
    /// 2 when the server hands out a login salt (and then always, for that origin), scheme 1
    /// only for a server that never has.
    static func secret(
        _ location: RemoteLocation, user: String, password: String, client: RemoteClient
    ) throws -> (secret: String, scheme: Int) {
        if let salt = try loginSalt(client, user: user) {
            try LoginSchemes.remember(location.origin)
            return (try loginSecret(password: password, user: user, origin: location.origin, serverSalt: salt), 2)
        }
        guard !LoginSchemes.knowsScheme2(location.origin) else {
            throw CABackupError.untrusted(
                "the server at \(location.serverURL) no longer offers the login scheme it used before: it may not be the server you registered with; no secret was sent"
            )
        }
        return (try legacyLoginSecret(password: password, user: user), 1)
    }

    /// The server's login salt for `user` (scheme 2), or nil from a server that has none
    /// (it predates scheme 2).
    static func loginSalt(_ client: RemoteClient, user: String) throws -> [UInt8]? {
        let reply = try client.call(.GET, "/v1/login/salt?user=" + user, accept: [200, 404], limit: 64 << 10)
        guard reply.status == 200 else { return nil }
        struct Salt: Decodable {
            let salt: String
            let scheme: Int
        }
        guard let s = try? JSONDecoder().decode(Salt.self, from: Data(reply.body)), s.scheme == 2,
            let salt = bytesFromHex(s.salt), salt.count == 32
        else {
            throw CABackupError.remote(status: reply.status, message: "the server's login salt is malformed")
        }
        return salt
    }

    /// What `GET /v1/account` says of the token's account, or nil from a server without
    /// that call (it predates append-only tokens and login scheme 2).
    struct Account: Decodable {
        let scheme: Int
        let origin: String
        /// `full` or `append-only`.
        let rights: String

        static func fetch(_ client: RemoteClient) throws -> Account? {
            let reply = try client.call(.GET, "/v1/account", accept: [200, 404], limit: 64 << 10)
            guard reply.status == 200 else { return nil }
            guard let a = try? JSONDecoder().decode(Account.self, from: Data(reply.body)) else {
                throw CABackupError.remote(status: reply.status, message: "the server's account answer is malformed")
            }
            return a
        }
    }

    /// Refuses a name no account can have, so a tool can say so before asking for a password.
    public static func checkUserName(_ user: String) throws {
        guard isValidUserName(user) else {
            throw CABackupError.invalidArgument(
                "'\(user)' is not a valid account name: use 1-64 characters a-z 0-9 . _ -")
        }
    }

    /// Creates an account and its empty private data space. The server says whether the
    /// name is taken only to a registration, which carries the login secret derived from
    /// the password; so the name's form and the password are checked here first.
    public static func register(
        server: String, user: String, email: String, password: String, caCertificate: String? = nil
    ) throws {
        let location = try RemoteLocation(parsing: server, requireUser: false)
        try checkUserName(user)
        try checkNewPassword(password)
        let client = try RemoteClient(
            server: location.serverURL, user: user, token: nil, caCertificate: caCertificate)
        let (secret, scheme) = try Self.secret(location, user: user, password: password, client: client)
        let body = try JSONSerialization.data(withJSONObject: [
            "user": user, "email": email, "secret": secret, "scheme": scheme, "origin": location.origin,
        ])
        _ = try client.call(
            .POST, "/v1/register", headers: [("Content-Type", "application/json")], body: Array(body),
            accept: [201])
    }

    /// Logs in as a new device and stores the token in ``CredentialStore``. An
    /// `appendOnly` token may read, add data and take the lock, but never delete or
    /// overwrite data, snapshots or key slots (`forget`, `prune`, `key remove` and `key
    /// passwd` need a full one).
    @discardableResult
    public static func login(
        server: String, user: String, password: String, device: String = currentHostname(),
        appendOnly: Bool = false, caCertificate: String? = nil
    ) throws -> String {
        let location = try RemoteLocation(parsing: server, requireUser: false)
        let client = try RemoteClient(
            server: location.serverURL, user: user, token: nil, caCertificate: caCertificate)
        let (secret, scheme) = try Self.secret(location, user: user, password: password, client: client)
        var fields: [String: Any] = ["user": user, "secret": secret, "device": device, "scheme": scheme]
        if appendOnly { fields["append_only"] = true }
        let reply = try client.call(
            .POST, "/v1/login", headers: [("Content-Type", "application/json")],
            body: Array(try JSONSerialization.data(withJSONObject: fields)), accept: [200, 401])
        if reply.status == 401 {
            // Refused: this is the login, so the advice is not to log in again.
            let rebind =
                scheme == 2
                ? "; an account made before logins were bound to the server's address (cabackup before format 3) logs in only after 'cabackup rebind --server \(location.serverURL) --user \(user)' on a device still logged in to it"
                : ""
            throw CABackupError.notLoggedIn(
                "the server at \(location.serverURL) did not accept the login of '\(user)' (\(RemoteClient.message(status: 401, body: reply.body))): check the user name and the password\(rebind)"
            )
        }
        struct Token: Decodable { let token: String }
        guard let t = try? JSONDecoder().decode(Token.self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's login answer is malformed")
        }
        try CredentialStore.store(server: location.serverURL, user: user, token: t.token, device: device)
        return t.token
    }

    /// Binds the account's login secret to the current scheme and to this server address,
    /// from a device still logged in: after a server upgrade (accounts made before scheme
    /// 2) or a change of the server's address. The password proves itself with the secret
    /// the account has now. Needs a full token.
    public static func rebind(server: String, user: String, password: String, caCertificate: String? = nil) throws {
        let location = try RemoteLocation(parsing: server, requireUser: false)
        let c = try client(server, user, caCertificate)
        guard let account = try Account.fetch(c), let salt = try loginSalt(c, user: user) else {
            throw CABackupError.remote(
                status: 404, message: "the server at \(location.serverURL) predates login scheme 2: upgrade it first")
        }
        let proof =
            account.scheme >= 2
            ? try loginSecret(password: password, user: user, origin: account.origin, serverSalt: salt)
            : try legacyLoginSecret(password: password, user: user)
        let secret = try loginSecret(password: password, user: user, origin: location.origin, serverSalt: salt)
        let body = try JSONSerialization.data(withJSONObject: [
            "proof": proof, "secret": secret, "origin": location.origin,
        ])
        _ = try c.call(
            .POST, "/v1/account/secret", headers: [("Content-Type", "application/json")], body: Array(body),
            accept: [204])
        try LoginSchemes.remember(location.origin)
    }

    /// The rights of this device's token: `full` or `append-only`.
    public static func rights(server: String, user: String, caCertificate: String? = nil) throws -> String {
        try Account.fetch(client(server, user, caCertificate))?.rights ?? "full"
    }

    /// Revokes this device's token on the server and forgets it locally.
    public static func logout(server: String, user: String, caCertificate: String? = nil) throws {
        let s = try RemoteLocation(parsing: server, requireUser: false).serverURL
        guard let token = CredentialStore.token(server: s, user: user) else {
            throw CABackupError.notLoggedIn("not logged in to \(s) as '\(user)': nothing to log out")
        }
        do {
            _ = try RemoteClient(server: s, user: user, token: token, caCertificate: caCertificate).call(
                .DELETE, "/v1/session", accept: [204])
        } catch CABackupError.notLoggedIn {
            // Already revoked or expired on the server: forgetting it is all that is left.
        }
        try CredentialStore.remove(server: s, user: user)
    }

    /// The devices (tokens) of the account.
    public static func devices(server: String, user: String, caCertificate: String? = nil) throws -> [DeviceInfo] {
        let c = try client(server, user, caCertificate)
        let reply = try c.call(.GET, "/v1/devices")
        guard let list = try? JSONDecoder().decode([DeviceInfo].self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's device list is malformed")
        }
        return list
    }

    /// Revokes one device's token (by the id ``devices(server:user:caCertificate:)`` shows).
    public static func revoke(server: String, user: String, device id: String, caCertificate: String? = nil) throws {
        _ = try client(server, user, caCertificate).call(.DELETE, "/v1/devices/" + id, accept: [204])
    }

    /// The bytes the account's space holds and its quota (`GET /v1/space/usage`).
    public static func usage(server: String, user: String, caCertificate: String? = nil) throws -> SpaceUsage {
        let reply = try client(server, user, caCertificate).call(.GET, "/v1/space/usage")
        guard let usage = try? JSONDecoder().decode(SpaceUsage.self, from: Data(reply.body)) else {
            throw CABackupError.remote(status: reply.status, message: "the server's usage answer is malformed")
        }
        return usage
    }

    static func client(_ server: String, _ user: String, _ ca: String?) throws -> RemoteClient {
        let s = try RemoteLocation(parsing: server, requireUser: false).serverURL
        guard let token = CredentialStore.token(server: s, user: user) else {
            throw CABackupError.notLoggedIn(
                "not logged in to \(s) as '\(user)': run 'cabackup login --server \(s) --user \(user)'")
        }
        return try RemoteClient(server: s, user: user, token: token, caCertificate: ca)
    }
}
