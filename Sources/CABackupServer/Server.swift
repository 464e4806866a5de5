import CABackup
import CABackupRemote
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// How `cabackup server` runs.
public struct ServerOptions: Sendable {
    /// Address to listen on (`127.0.0.1`, `0.0.0.0`, …).
    public var host: String
    /// Port; 0 picks a free one (reported through `onListening`).
    public var port: Int
    /// Where accounts (`accounts.sqlite`) and spaces (`spaces/NAME/`) live. With
    /// ``storage``, only the spaces' indexes and uploads in progress are kept here.
    public var dataDirectory: String
    /// An S3 location (`s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`) for the spaces' files,
    /// each under `PREFIX/spaces/NAME/`; nil keeps them in ``dataDirectory``. The
    /// credentials come from `AWS_*` in the environment.
    public var storage: String?
    /// A PostgreSQL database (`postgresql://USER@HOST[:PORT]/DB`) for the accounts, shared
    /// by every instance that names it; nil keeps them in ``dataDirectory``.
    public var database: String?
    /// The database user's password (from `PGPASSWORD` or a file, never the command line).
    public var databasePassword: String?
    /// PEM certificate chain and private key: serve HTTPS.
    public var tlsCertificate: String?
    public var tlsKey: String?
    /// Bytes each space may hold (packs, records, keys, config); nil for no limit.
    public var quotaBytes: Int64?
    /// How long a device token stays valid without a new login.
    public var tokenLifetimeSeconds: Int64 = 365 * 24 * 3600
    /// The largest pack accepted (one pack is the most a request may carry): a client
    /// closes packs at its config's pack size, at most 128 MiB.
    public var maxPackBytes: Int64 = 128 << 20
    /// Seconds a connection may go without a byte received or sent (a stalled upload, a
    /// client that stops reading, an idle keep-alive) before the server closes it, freeing
    /// its descriptor and any temporary file.
    public var idleTimeoutSeconds: Int64 = 30
    /// Connections served at once; more wait to be accepted. Also kept below the
    /// process's descriptor limit.
    public var maxConnections = 1000
    /// Uploads one space may have in progress; more get 503 with Retry-After, which the
    /// client honours. A client keeps one upload in flight; eight leave room for several
    /// devices of one account.
    public var maxUploadsPerSpace = 8
    /// Login attempts per client address per minute (on top of the back-off after failures).
    public var loginsPerMinute = 30
    /// Registrations per client address per hour.
    public var registrationsPerHour = 10
    /// Addresses of reverse proxies whose `X-Forwarded-For` is believed for the client's
    /// address; from anyone else the header is ignored.
    public var trustedProxies: Set<String> = []
    /// Device tokens one account may hold.
    public var maxTokensPerAccount = 100
    /// Key slots one space may hold (each costs every device's open a derivation).
    public var maxKeySlotsPerSpace = 10
    /// Address and port to serve `GET /metrics` on (Prometheus text format), apart from
    /// the API; nil serves none. Port 0 picks a free one (reported through
    /// `onMetricsListening`).
    public var metricsHost: String?
    public var metricsPort = 9464
    /// How the log lines on stderr look.
    public var logFormat = ServerLogFormat.text

    public init(host: String, port: Int, dataDirectory: String) {
        self.host = host
        self.port = port
        self.dataDirectory = dataDirectory
    }
}

/// The private-data-space server: runs until the process is stopped. `onListening` gets
/// the URL it serves (with the real port when `port` was 0), `onMetricsListening` the URL
/// of its metrics when ``ServerOptions/metricsHost`` is set.
public func runServer(
    _ options: ServerOptions, onListening: @escaping @Sendable (String) -> Void,
    onMetricsListening: @escaping @Sendable (String) -> Void = { _ in }
) async throws {
    var logger = options.logFormat.logger(label: "cabackup.server")
    logger.logLevel = .info
    let metrics = ServerMetrics()
    let api = try await ServerAPI(options: options, metrics: metrics, logger: logger)
    let router = Router(context: ServerContext.self)
    router.add(middleware: RequestMetrics(metrics: metrics, logger: logger))
    api.install(on: router)
    let scheme = options.tlsCertificate == nil ? "http" : "https"
    let host = options.host
    let onRunning: @Sendable (any Channel) async -> Void = { channel in
        let port = channel.localAddress?.port ?? options.port
        onListening("\(scheme)://\(host.contains(":") ? "[\(host)]" : host):\(port)")
    }
    let configuration = ApplicationConfiguration(
        address: .hostname(options.host, port: options.port),
        availableConnectionsDelegate: .maximum(connectionLimit(options.maxConnections), logger: logger))
    var quiet = logger
    quiet.logLevel = .warning
    let idle = TimeAmount.seconds(options.idleTimeoutSeconds)
    let http1 = HTTPServerBuilder.http1(
        configuration: .init(
            additionalChannelHandlers: [IdleStateHandler(allTimeout: idle), CloseWhenIdle(), BodyByteCounter(metrics)],
            idleTimeout: idle))
    let metricsApp = options.metricsHost.map {
        metricsApplication(
            metrics, host: $0, port: options.metricsPort, logger: quiet, onListening: onMetricsListening)
    }
    if let cert = options.tlsCertificate, let key = options.tlsKey {
        var tls: TLSConfiguration
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(cert)
            let privateKey = try NIOSSLPrivateKey(file: key, format: .pem)
            tls = TLSConfiguration.makeServerConfiguration(
                certificateChain: chain.map { .certificate($0) }, privateKey: .privateKey(privateKey))
        } catch {
            throw CABackupError.invalidArgument("cannot load the TLS certificate or key (\(error)): give PEM files")
        }
        // TLS 1.2 and 1.3 only, and for 1.2 only forward-secret AEAD suites: no CBC, no SHA-1.
        tls.minimumTLSVersion = .tlsv12
        tls.cipherSuites = [
            "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
        ].joined(separator: ":")
        let app = Application(
            router: router, server: try .tls(http1, tlsConfiguration: tls), configuration: configuration,
            onServerRunning: onRunning, logger: quiet)
        try await serve(app, metrics: metricsApp, api: api, logger: logger)
    } else {
        let app = Application(
            router: router, server: http1, configuration: configuration, onServerRunning: onRunning, logger: quiet)
        try await serve(app, metrics: metricsApp, api: api, logger: logger)
    }
}

/// Runs the application until SIGTERM or SIGINT, then shuts down gracefully: `/healthz`
/// answers 503 at once (a load balancer stops sending requests), no new connection is
/// accepted, idle keep-alive connections are closed, and the requests in flight finish
/// (an upload in progress is received and stored whole, or, stalled, cut at the idle
/// timeout and its temporary file removed) before the process exits with 0.
/// The metrics listener, when there is one, stops last: it can be scraped while the
/// requests in flight finish.
func serve(_ app: some Service, metrics: (some Service)?, api: ServerAPI, logger: Logger) async throws {
    let services: [ServiceGroupConfiguration.ServiceConfiguration] =
        (metrics.map { [.init(service: $0)] } ?? []) + [
            .init(service: app), .init(service: DrainOnShutdown(api: api, logger: logger)),
        ]
    let group = ServiceGroup(
        configuration: .init(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
    try await group.run()
    await api.database?.close()
    logger.info("stopped")
}

/// Marks the server as draining when a graceful shutdown begins. Services stop in reverse
/// order, so this one hears of the shutdown before the application does.
struct DrainOnShutdown: Service {
    let api: ServerAPI
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        api.draining.store(true, ordering: .relaxed)
        logger.info("stopping: no new connections; finishing the requests in flight")
    }
}

/// The account records: in the shared database when there is one, else in
/// `DATA/accounts.sqlite`.
func accountRecords(dataDirectory: String, database: PostgresDatabase?) throws -> any AccountRecords {
    if let database { return PostgresAccountRecords(database) }
    return try SQLiteAccountRecords(path: dataDirectory + "/accounts.sqlite")
}

extension Optional {
    /// `map` with an async transform.
    func asyncMap<T>(_ transform: (Wrapped) async throws -> T) async rethrows -> T? {
        guard let value = self else { return nil }
        return try await transform(value)
    }
}

/// Where the files of `user`'s space live: `DATA/spaces/NAME/`, or `PREFIX/spaces/NAME/` in
/// the bucket.
func spaceStorage(of user: String, dataDirectory: String, bucket: S3Location?) throws -> any Storage {
    guard var location = bucket else { return LocalStorage(path: dataDirectory + "/spaces/" + user) }
    location.prefix = (location.prefix.isEmpty ? "" : location.prefix + "/") + "spaces/" + user
    return try S3Storage(location)
}

/// Raises the soft descriptor limit to the hard one and returns how many connections can
/// be served at once: `wanted`, or fewer when the descriptors would not suffice (each
/// connection holds one, an upload a second; 64 stay for files and the databases).
func connectionLimit(_ wanted: Int) -> Int {
    guard let available = raiseDescriptorLimit() else { return min(wanted, 400) }
    return max(1, min(wanted, (available - 64) / 2))
}

/// Closes a connection on which nothing was received or sent for the idle timeout
/// (``IdleStateHandler`` raises the event): a stalled header, a stalled upload, a client
/// that stopped reading a download. It also bounds what a connection may have queued for
/// sending: 256 KiB in the kernel and 256 KiB in the server. Measured with 40 clients
/// that never read a 16 MiB pack, the server's own memory grows by about 400 KiB for
/// each such connection, on a loaded machine too (``ServerAPI`` waits for the event
/// loop after each piece it streams).
final class CloseWhenIdle: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    func handlerAdded(context: ChannelHandlerContext) {
        guard let options = context.channel.syncOptions else { return }
        try? options.setOption(ChannelOptions.socketOption(.so_sndbuf), value: 256 << 10)
        try? options.setOption(
            ChannelOptions.writeBufferWaterMark, value: .init(low: 64 << 10, high: 256 << 10))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// The request context: Hummingbird's core storage plus the peer's address, for the
/// per-address limits on logins and registrations.
struct ServerContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let peer: String
    /// The connection's event loop, which a streamed answer waits on between pieces.
    let eventLoop: any EventLoop

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        peer = source.channel.remoteAddress?.ipAddress ?? "unknown"
        eventLoop = source.channel.eventLoop
    }
}

/// The `/v1` HTTP API (documented in `docs/http-api.md`).
final class ServerAPI: Sendable {
    let options: ServerOptions
    let accounts: Accounts
    let metrics: ServerMetrics
    let logger: Logger
    private let spaces = Mutex<[String: Task<Space, any Error>]>([:])
    /// Threads for blocking storage calls (disk, or an object store over the network).
    let io: NIOThreadPool
    /// Set when a graceful shutdown begins: `/healthz` answers 503.
    let draining = Atomic(false)
    /// The database shared with other instances, when there is one.
    let database: PostgresDatabase?
    /// Where the spaces' files live when not in the data directory, and a storage at its
    /// root that health checks ask.
    let bucket: (base: S3Location, probe: any Storage)?
    let logins: RateLimiter
    let registrations: RateLimiter
    static let sizeHeader = HTTPField.Name("X-Cabackup-Size")!
    static let forwardedFor = HTTPField.Name("X-Forwarded-For")!
    static let idempotencyKey = HTTPField.Name("Idempotency-Key")!
    static let smallBodyLimit = 64 << 20

    init(options: ServerOptions, metrics: ServerMetrics, logger: Logger) async throws {
        self.options = options
        self.metrics = metrics
        self.logger = logger
        // Accounts and spaces are the server's alone: 0700 directories, 0600 files.
        umask(0o077)
        try makeDirectories(options.dataDirectory + "/spaces")
        chmod(options.dataDirectory, 0o700)
        database = try await options.database.asyncMap {
            try await PostgresDatabase.open($0, password: options.databasePassword, metrics: metrics)
        }
        try await database?.migrate()
        accounts = try await Accounts(
            records: try accountRecords(dataDirectory: options.dataDirectory, database: database),
            tokenLifetimeSeconds: options.tokenLifetimeSeconds, maxTokensPerAccount: options.maxTokensPerAccount)
        io = NIOThreadPool(numberOfThreads: 16)
        io.start()
        if let storage = options.storage {
            let base = try S3Location(parsing: storage)
            let probe = MeteredStorage(try S3Storage(base), calls: metrics.storageCalls)
            do {
                _ = try await io.runIfActive { try probe.list(.snapshot) }
            } catch CABackupError.repositoryNotFound {
                throw CABackupError.invalidArgument(
                    "the bucket '\(base.bucket)' does not exist at \(base.endpoint): create it, or give --storage a bucket that does"
                )
            }
            bucket = (base, probe)
        } else {
            bucket = nil
        }
        logins = RateLimiter(limit: options.loginsPerMinute, windowSeconds: 60)
        registrations = RateLimiter(limit: options.registrationsPerHour, windowSeconds: 3600)
    }

    /// The client's address: the peer's, or, when the peer is a trusted reverse proxy, the
    /// last address it appended to `X-Forwarded-For`.
    func clientAddress(_ req: Request, _ ctx: ServerContext) -> String {
        guard options.trustedProxies.contains(ctx.peer), let header = req.headers[Self.forwardedFor],
            let last = header.split(separator: ",").last?.trimmingCharacters(in: .whitespaces), !last.isEmpty
        else { return ctx.peer }
        return String(last.prefix(64))
    }

    /// The caller's own space. No request can name another: the path has no user in it.
    /// A space is opened (and its records reconciled) once, by the first request for it.
    func space(_ caller: Caller) async throws -> Space {
        let user = caller.user
        let opening = try spaces.withLock { all in
            if let s = all[user] { return s }
            let root = options.dataDirectory + "/spaces/" + user
            // A space in the data directory is made at registration; in a bucket, every
            // account has one (its token was just checked), and only its index is local.
            guard isValidUserName(user), bucket != nil || isDirectory(root) else {
                throw APIError(404, "the account has no space")
            }
            let io = self.io
            let storage = try self.storage(of: user)
            let database = self.database
            let opening = Task {
                try makeDirectories(root + "/index")
                let records: any SpaceRecords =
                    if let database { PostgresSpaceRecords(database, space: user) } else {
                        try SQLiteSpaceRecords(indexPath: root + "/index/server.sqlite")
                    }
                return try await Space(
                    user: user, storage: storage, records: records,
                    uploadDirectory: root + "/tmp", io: io)
            }
            all[user] = opening
            return opening
        }
        do {
            return try await opening.value
        } catch {
            spaces.withLock { _ = $0.removeValue(forKey: user) }
            throw error
        }
    }

    func storage(of user: String) throws -> any Storage {
        MeteredStorage(
            try spaceStorage(of: user, dataDirectory: options.dataDirectory, bucket: bucket?.base),
            calls: metrics.storageCalls)
    }

    /// The quota of the caller's space: the account's own, else `--quota-bytes`.
    func quota(of caller: Caller) -> Int64? { caller.quotaBytes ?? options.quotaBytes }

    func install(on router: Router<ServerContext>) {
        router.get("/healthz") { req, _ in await self.handle(req) { try await self.health() } }
        router.post("/v1/register") { req, ctx in
            await self.handle(req) { try await self.register(req, client: self.clientAddress(req, ctx)) }
        }
        router.post("/v1/login") { req, ctx in
            await self.handle(req) { try await self.login(req, client: self.clientAddress(req, ctx)) }
        }
        router.get("/v1/login/salt") { req, _ in
            await self.handle(req) {
                let user = req.uri.queryParameters.get("user").map { String($0) } ?? ""
                guard isValidUserName(user) else { throw APIError(400, "give ?user=NAME, a valid account name") }
                return try Self.json(
                    200, LoginSaltAnswer(salt: hexString(self.accounts.loginSalt(for: user)), scheme: 2))
            }
        }
        router.get("/v1/account") { req, _ in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                let a = try await self.accounts.account(of: caller)
                return try Self.json(
                    200,
                    AccountAnswer(
                        user: caller.user, scheme: a.scheme, origin: a.origin,
                        rights: caller.canDelete ? "full" : "append-only"))
            }
        }
        router.post("/v1/account/secret") { req, _ in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                var request = req
                let r = try await Self.decode(Rebind.self, &request)
                try await self.accounts.rebind(caller, proof: r.proof, secret: r.secret, origin: r.origin)
                return Self.empty(204)
            }
        }
        router.delete("/v1/session") { req, _ in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                try await self.accounts.revoke(caller, id: nil)
                return Self.empty(204)
            }
        }
        router.get("/v1/devices") { req, _ in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                return try Self.json(200, try await self.accounts.devices(of: caller))
            }
        }
        router.delete("/v1/devices/:id") { req, ctx in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                try await self.accounts.revoke(caller, id: ctx.parameters.get("id") ?? "")
                return Self.empty(204)
            }
        }
        router.get("/v1/space/usage") { req, _ in
            await self.handle(req) {
                let caller = try await self.accounts.authenticate(req.headers[.authorization])
                let s = try await self.space(caller)
                let (used, _) = try await s.records.usage()
                return try Self.json(200, UsageAnswer(used: used, quota: self.quota(of: caller)))
            }
        }
        router.head("/v1/space/config") { req, _ in
            await self.handle(req) { try await self.head(req, .config, "config") }
        }
        router.get("/v1/space/config") { req, ctx in
            await self.handle(req) { try await self.get(req, .config, "config", on: ctx.eventLoop) }
        }
        router.put("/v1/space/config") { req, _ in await self.handle(req) { try await self.put(req, .config, "config") }
        }
        for (segment, kind) in [("packs", FileKind.pack), ("snapshots", .snapshot), ("keys", .key)] {
            router.get("/v1/space/\(segment)") { req, _ in await self.handle(req) { try await self.list(req, kind) } }
            router.head("/v1/space/\(segment)/:name") { req, ctx in
                await self.handle(req) { try await self.head(req, kind, try Self.name(ctx)) }
            }
            router.get("/v1/space/\(segment)/:name") { req, ctx in
                await self.handle(req) { try await self.get(req, kind, try Self.name(ctx), on: ctx.eventLoop) }
            }
            router.put("/v1/space/\(segment)/:name") { req, ctx in
                await self.handle(req) { try await self.put(req, kind, try Self.name(ctx)) }
            }
            router.delete("/v1/space/\(segment)/:name") { req, ctx in
                await self.handle(req) { try await self.delete(req, kind, try Self.name(ctx)) }
            }
        }
        router.post("/v1/space/blobs/missing") { req, _ in await self.handle(req) { try await self.missing(req) } }
        router.post("/v1/space/locks") { req, _ in await self.handle(req) { try await self.lock(req) } }
        router.put("/v1/space/locks/:id") { req, ctx in
            await self.handle(req) {
                let s = try await self.space(try await self.accounts.authenticate(req.headers[.authorization]))
                guard try await s.records.renew(ctx.parameters.get("id") ?? "") else {
                    throw APIError(404, "no such lock (it lapsed)")
                }
                self.metrics.leasesRenewed.increment()
                return Self.empty(204)
            }
        }
        router.delete("/v1/space/locks/:id") { req, ctx in
            await self.handle(req) {
                let s = try await self.space(try await self.accounts.authenticate(req.headers[.authorization]))
                guard try await s.records.releaseLease(ctx.parameters.get("id") ?? "") else {
                    throw APIError(404, "no such lock")
                }
                self.metrics.leasesReleased.increment()
                return Self.empty(204)
            }
        }
    }

    // MARK: Plumbing

    struct Health: Encodable {
        let status: String
        let error: String?
    }

    /// Ready when the accounts and the spaces' storage answer, and not shutting down: what
    /// a load balancer's health check asks.
    func health() async throws -> Response {
        if draining.load(ordering: .relaxed) { return try Self.json(503, Health(status: "draining", error: nil)) }
        do {
            try await accounts.records.checkReachable()
            let spaces = options.dataDirectory + "/spaces"
            let probe = bucket?.probe
            try await io.runIfActive {
                guard isDirectory(spaces) else { throw APIError(503, "the data directory \(spaces) is gone") }
                _ = try probe?.list(.snapshot)
            }
        } catch {
            // The reason (hosts, paths) is the operator's, in the log; anyone may ask /healthz.
            logger.error("health check failed: \(error)")
            return try Self.json(503, Health(status: "unavailable", error: nil))
        }
        return try Self.json(200, Health(status: "ok", error: nil))
    }

    /// Runs a handler, turning every error into a JSON `{"error": …}` answer (the request
    /// is logged and counted by ``RequestMetrics``).
    func handle(_ req: Request, _ body: () async throws -> Response) async -> Response {
        let response: Response
        do {
            response = try await body()
        } catch let e as APIError {
            response = Self.error(e.status, e.message)
        } catch let e as any HTTPResponseError {
            response = Self.error(Int(e.status.code), "request refused (\(e.status.reasonPhrase))")
        } catch {
            // The detail (paths, errno) goes to the operator's log only; the client gets a
            // reference to quote.
            let reference = hexString(secureRandomBytes(4))
            logger.error("\(req.method) \(req.uri.path) failed [\(reference)]: \(error)")
            response = Self.error(
                500, "the server failed to do that (reference \(reference) in its log): try again later")
        }
        return response
    }

    static func error(_ status: Int, _ message: String) -> Response {
        var response = (try? json(status, ["error": message])) ?? empty(500)
        if status == 503 { response.headers[.retryAfter] = "1" }
        return response
    }

    static func empty(_ status: Int, headers: HTTPFields = [:]) -> Response {
        Response(status: HTTPResponse.Status(code: status), headers: headers)
    }

    static func bytes(_ status: Int, _ b: [UInt8], headers: HTTPFields = [:]) -> Response {
        Response(
            status: HTTPResponse.Status(code: status), headers: headers,
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: b)))
    }

    static func json(_ status: Int, _ value: some Encodable) throws -> Response {
        let data = try JSONEncoder().encode(value)
        return bytes(status, Array(data), headers: [.contentType: "application/json"])
    }

    static func name(_ ctx: ServerContext) throws -> String {
        guard let n = ctx.parameters.get("name"), n.utf8.count == 64, ObjectID(hex: n) != nil,
            n == n.lowercased()
        else {
            throw APIError(400, "object names are 64 lowercase hex digits")
        }
        return n
    }

    static func decode<T: Decodable>(_ type: T.Type, _ req: inout Request, limit: Int = 1 << 20) async throws -> T {
        let buffer: ByteBuffer
        do {
            buffer = try await req.collectBody(upTo: limit)
        } catch {
            throw APIError(413, "request body is larger than \(limit) bytes")
        }
        guard let v = try? JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView)) else {
            throw APIError(400, "malformed JSON body: see docs/http-api.md for the fields")
        }
        return v
    }

    // MARK: Accounts

    struct Registration: Decodable {
        let user: String
        let email: String
        let secret: String
        /// 2: the secret is bound to the server's origin and salt; absent (1) from clients
        /// that predate it.
        let scheme: Int?
        let origin: String?
    }

    struct LoginSaltAnswer: Encodable {
        let salt: String
        let scheme: Int
    }

    struct AccountAnswer: Encodable {
        let user: String
        let scheme: Int
        let origin: String
        let rights: String
    }

    /// What `GET /v1/space/usage` answers: the bytes the space holds and its quota (nil:
    /// none).
    struct UsageAnswer: Encodable {
        let used: Int64
        let quota: Int64?

        func encode(to encoder: any Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(used, forKey: .used)
            try c.encode(quota, forKey: .quota)
        }
        enum CodingKeys: String, CodingKey { case used, quota }
    }

    struct Rebind: Decodable {
        let proof: String
        let secret: String
        let origin: String
    }

    func register(_ request: Request, client: String) async throws -> Response {
        guard registrations.allow(client) else {
            throw APIError(429, "too many registrations from this address: try again in an hour")
        }
        var req = request
        let r = try await Self.decode(Registration.self, &req)
        try await accounts.register(
            user: r.user, email: r.email, secret: r.secret, scheme: r.scheme ?? 1, origin: r.origin ?? "")
        let root = options.dataDirectory + "/spaces/" + r.user
        // A space of a deleted account of the same name may still be open here.
        spaces.withLock { _ = $0.removeValue(forKey: r.user) }
        if bucket == nil { try LocalStorage(path: root).create() } else { try makeDirectories(root) }
        logger.info("registered account \(r.user)")
        return try Self.json(201, ["user": r.user])
    }

    struct Login: Decodable {
        let user: String
        let secret: String
        let device: String?
        let scheme: Int?
        let appendOnly: Bool?

        enum CodingKeys: String, CodingKey {
            case user, secret, device, scheme
            case appendOnly = "append_only"
        }
    }

    func login(_ request: Request, client: String) async throws -> Response {
        guard logins.allow(client) else {
            throw APIError(429, "too many logins from this address: try again in a minute")
        }
        var req = request
        let l = try await Self.decode(Login.self, &req)
        let token = try await accounts.login(
            user: l.user, secret: l.secret, scheme: l.scheme ?? 1, device: l.device ?? "device",
            appendOnly: l.appendOnly ?? false, client: client)
        return try Self.json(200, ["token": token])
    }

    // MARK: Space files

    func list(_ req: Request, _ kind: FileKind) async throws -> Response {
        let s = try await space(try await accounts.authenticate(req.headers[.authorization]))
        let storage = s.storage
        return try Self.json(200, try await s.blocking { try storage.list(kind).sorted() })
    }

    func head(_ req: Request, _ kind: FileKind, _ name: String) async throws -> Response {
        let s = try await space(try await accounts.authenticate(req.headers[.authorization]))
        let storage = s.storage
        guard let size = try await s.blocking({ try storage.stat(kind, name) }) else { return Self.empty(404) }
        return Self.empty(200, headers: [Self.sizeHeader: String(size)])
    }

    func get(_ req: Request, _ kind: FileKind, _ name: String, on eventLoop: any EventLoop) async throws -> Response {
        let s = try await space(try await accounts.authenticate(req.headers[.authorization]))
        let storage = s.storage
        guard let size = try await s.blocking({ try storage.stat(kind, name) }) else {
            throw APIError(404, "no such \(kind) in this space")
        }
        var from: Int64 = 0
        var to = size - 1
        var status = 200
        var headers: HTTPFields = [.contentType: "application/octet-stream"]
        if let range = req.headers[.range] {
            guard let r = Self.parseRange(range, size: size) else {
                throw APIError(416, "range '\(range)' is not inside the \(size)-byte file")
            }
            (from, to, status) = (r.0, r.1, 206)
            headers[.contentRange] = "bytes \(from)-\(to)/\(size)"
        }
        // Streamed in pieces of at most 64 KiB, each written only when the connection
        // takes it: a client that does not read holds one piece, whatever it asked for.
        // A write only queues the piece for the connection's event loop, and the writer
        // learns that the connection is full only once the loop has run it; waiting on the
        // loop after each piece keeps a busy loop from letting pieces pile up unsent.
        let length = Int(to - from + 1)
        let start = from
        // From an object store each read is a request: 1 MiB of it at a time, still
        // handed to the connection 64 KiB at a time.
        let readSize = storage.workingDirectory != nil ? 64 << 10 : 1 << 20
        let body = ResponseBody(contentLength: length) { writer in
            var offset = start
            var left = length
            while left > 0 {
                let n = min(left, readSize)
                let at = offset
                var piece = try await s.blocking {
                    var piece = ByteBufferAllocator().buffer(capacity: n)
                    try piece.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { (raw) throws in
                        try storage.read(kind, name, offset: at, length: n, into: raw.baseAddress!)
                        return n
                    }
                    return piece
                }
                while let slice = piece.readSlice(length: min(piece.readableBytes, 64 << 10)), slice.readableBytes > 0 {
                    try await writer.write(slice)
                    try await eventLoop.submit {}.get()
                }
                offset += Int64(n)
                left -= n
            }
            try await writer.finish(nil)
        }
        return Response(status: HTTPResponse.Status(code: status), headers: headers, body: body)
    }

    /// `bytes=A-B` with 0 <= A <= B < size.
    static func parseRange(_ s: String, size: Int64) -> (Int64, Int64)? {
        guard s.hasPrefix("bytes=") else { return nil }
        let parts = s.dropFirst(6).split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, let a = Int64(parts[0]), let b = Int64(parts[1]), a >= 0, a <= b, b < size else {
            return nil
        }
        return (a, b)
    }

    /// Stores an upload, timing the stored ones and counting quota refusals.
    func put(_ request: Request, _ kind: FileKind, _ name: String) async throws -> Response {
        let start = ContinuousClock.now
        do {
            let response = try await store(request, kind, name)
            metrics.uploaded(kind, seconds: (ContinuousClock.now - start).inSeconds)
            return response
        } catch let e as APIError where e.refusesQuota {
            metrics.quotaRefusals.increment()
            throw e
        }
    }

    func store(_ request: Request, _ kind: FileKind, _ name: String) async throws -> Response {
        var req = request
        let caller = try await accounts.authenticate(req.headers[.authorization])
        let s = try await space(caller)
        // Every upload says its length first, so it can be refused (too large, over quota)
        // before its body is stored; each space takes a bounded number at once.
        guard let declared = req.headers[.contentLength].flatMap({ Int64($0) }), declared >= 0 else {
            throw APIError(411, "an upload needs a Content-Length header")
        }
        let limit = kind == .pack ? options.maxPackBytes : Int64(kind == .snapshot ? Self.smallBodyLimit : 1 << 20)
        guard declared <= limit else {
            throw APIError(413, "a \(kind) upload is at most \(limit) bytes; this one says \(declared)")
        }
        guard s.beginUpload(limit: options.maxUploadsPerSpace) else {
            throw APIError(503, "the space has \(options.maxUploadsPerSpace) uploads in progress: try again shortly")
        }
        defer { s.endUpload() }
        switch kind {
        case .pack:
            let reservation: Reservation
            do { reservation = try await s.records.reserve(declared, quota: quota(of: caller)) } catch {
                // Read and drop the body, so the client sees this answer rather than a
                // connection closed under its upload.
                for try await _ in req.body {}
                throw error
            }
            do {
                try await receivePack(req, space: s, name: name, declared: declared, reservation: reservation)
            } catch {
                await s.records.release(reservation)
                throw error
            }
            await s.records.release(reservation)  // a no-op once stored
        case .snapshot:
            try await receiveSnapshot(&req, space: s, name: name, quota: quota(of: caller))
        case .lock:
            throw APIError(404, "a space keeps no lock objects: it leases its lock (POST /v1/space/locks)")
        case .key, .config:
            let body: ByteBuffer
            do { body = try await req.collectBody(upTo: 1 << 20) } catch {
                throw APIError(413, "a \(kind) is at most 1 MiB")
            }
            let bytes = Array(body.readableBytesView)
            if kind == .key {
                guard sha256(bytes).hex == name, KeySlot.decode(bytes) != nil else {
                    throw APIError(400, "not a key slot, or its content does not match its name")
                }
            } else {
                let file: ConfigFile
                do { file = try ConfigFile.decode(bytes, path: "config") } catch {
                    throw APIError(400, "not a repository config (\(error))")
                }
                guard file.isEncrypted else {
                    throw APIError(400, "a space holds an encrypted repository only: init without --no-encryption")
                }
            }
            try await s.storeFile(
                kind, name, bytes, quota: quota(of: caller), maxKeySlots: options.maxKeySlotsPerSpace)
        }
        logger.info("\(caller.user) stored \(kind) \(name.prefix(12))")
        return Self.empty(201)
    }

    /// Streams a pack body to a temporary file, hashing on the way, then verifies and
    /// stores it. Nothing is kept in memory beyond the body's current buffer.
    func receivePack(
        _ req: Request, space s: Space, name: String, declared: Int64, reservation: Reservation
    ) async throws {
        let temporary = s.uploadDirectory + "/upload-\(hexString(secureRandomBytes(8)))"
        let fd = open(temporary, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 { throw APIError(500, "cannot create an upload file") }
        var stored = false
        defer {
            close(fd)
            if !stored { unlink(temporary) }
        }
        let hasher = SHA256Hasher()
        var size: Int64 = 0
        var extended = ContinuousClock.now
        for try await buffer in req.body {
            if ContinuousClock.now - extended > .seconds(60) {
                await s.records.extend(reservation)
                extended = .now
            }
            size += Int64(buffer.readableBytes)
            if size > declared {
                throw APIError(400, "the pack is longer than its Content-Length of \(declared) bytes")
            }
            try buffer.readableBytesView.withUnsafeBytes { raw in
                hasher.update(raw)
                try writeAll(fd, raw, path: temporary)
            }
        }
        guard size == declared else {
            throw APIError(400, "the pack ended after \(size) of its \(declared) bytes: upload it again")
        }
        try await s.storePack(
            name: name, temporary: temporary, fd: fd, size: size, digest: hasher.finish(), reservation: reservation)
        stored = true
    }

    /// A snapshot record, accepted only when the space holds every blob it declares.
    /// Body: `u32 LE record length ‖ record ‖ n × 32-byte blob ids`.
    func receiveSnapshot(_ req: inout Request, space s: Space, name: String, quota: Int64?) async throws {
        let body: ByteBuffer
        do { body = try await req.collectBody(upTo: Self.smallBodyLimit) } catch {
            throw APIError(413, "a snapshot upload is at most \(Self.smallBodyLimit) bytes")
        }
        let bytes = Array(body.readableBytesView)
        guard bytes.count >= 4 else { throw APIError(400, "snapshot upload is truncated") }
        let n = Int(UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24)
        guard n > 0, 4 + n <= bytes.count, (bytes.count - 4 - n) % 32 == 0 else {
            throw APIError(400, "snapshot upload is malformed: u32 length, record, then 32-byte ids")
        }
        let record = Array(bytes[4..<(4 + n)])
        guard sha256(record).hex == name else { throw APIError(400, "snapshot record does not match its name") }
        var refs: [BlobID] = []
        refs.reserveCapacity((bytes.count - 4 - n) / 32)
        bytes.withUnsafeBytes { raw in
            var o = 4 + n
            while o < raw.count {
                refs.append(ObjectID(UnsafeRawBufferPointer(rebasing: raw[o..<(o + 32)])))
                o += 32
            }
        }
        let missing = try await s.records.missing(refs)
        guard missing.isEmpty else {
            throw APIError(
                409,
                "the snapshot references \(missing.count) blobs this space does not hold (first \(missing[0].hex.prefix(12))): run the snapshot again"
            )
        }
        try await s.storeFile(
            .snapshot, name, record, quota: quota, maxKeySlots: options.maxKeySlotsPerSpace)
    }

    func delete(_ req: Request, _ kind: FileKind, _ name: String) async throws -> Response {
        let caller = try await accounts.authenticate(req.headers[.authorization])
        try caller.requireFullRights("delete it")
        let s = try await space(caller)
        guard try await s.remove(kind, name) else { throw APIError(404, "no such \(kind) in this space") }
        logger.info("\(caller.user) deleted \(kind) \(name.prefix(12))")
        return Self.empty(204)
    }

    struct MissingRequest: Decodable { let ids: [String] }

    func missing(_ request: Request) async throws -> Response {
        var req = request
        let s = try await space(try await accounts.authenticate(req.headers[.authorization]))
        let m = try await Self.decode(MissingRequest.self, &req, limit: 16 << 20)
        guard m.ids.count <= 100_000 else { throw APIError(400, "ask about at most 100000 ids at once") }
        var ids: [BlobID] = []
        for h in m.ids {
            guard let id = ObjectID(hex: h) else { throw APIError(400, "'\(h.prefix(70))' is not a 64-hex-digit id") }
            ids.append(id)
        }
        return try Self.json(200, ["missing": try await s.records.missing(ids).map(\.hex)])
    }

    struct LockRequest: Decodable { let exclusive: Bool }

    func lock(_ request: Request) async throws -> Response {
        var req = request
        let s = try await space(try await accounts.authenticate(req.headers[.authorization]))
        let l = try await Self.decode(LockRequest.self, &req)
        // A retry of a request whose answer was lost carries the same key and gets the
        // same lease, rather than a second one that would hold the lock until it lapses.
        let key = req.headers[Self.idempotencyKey]
        if let key, key.utf8.count > 64 || key.isEmpty {
            throw APIError(400, "an Idempotency-Key is 1 to 64 characters")
        }
        guard let id = try await s.records.acquire(exclusive: l.exclusive, key: key) else {
            throw APIError(409, l.exclusive ? "the space is in use (a snapshot or prune runs)" : "a prune runs")
        }
        metrics.leasesGranted.increment()
        return try Self.json(201, ["id": id])
    }
}
