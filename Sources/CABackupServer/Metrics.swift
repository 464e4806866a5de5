import CABackup
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTPTypes
import Prometheus
import ServiceLifecycle

/// What the server counts, in one Prometheus registry that `--metrics-listen` serves
/// (`GET /metrics`, text format). The names and what they mean are listed in
/// `docs/operations.md`.
///
/// Labels take bounded values only (route patterns, methods, status codes, file kinds,
/// storage operations): nothing names an account, a device or a file. Each counter is
/// made once; counting is an atomic add, with no lock but the histograms' own.
///
/// Every server has one, whether or not it is served: a registry of its own, never the
/// process-wide `MetricsSystem`, so servers started in one process (tests) count apart.
public final class ServerMetrics: Sendable {
    public let registry = PrometheusCollectorRegistry()
    /// Bytes of request and response bodies (not headers), over every connection.
    let bytesReceived: Counter
    let bytesSent: Counter
    /// Seconds from an upload's first header to its stored answer, per file kind.
    private let uploadSeconds: [FileKind: ValueHistogram]
    /// Uploads refused because the space's quota would be exceeded (413).
    let quotaRefusals: Counter
    let leasesGranted: Counter
    let leasesReleased: Counter
    let leasesRenewed: Counter
    /// Calls to the spaces' storage (a directory or a bucket), per operation; over S3
    /// each is one request (a listing one per 1000 names).
    let storageCalls: StorageCalls
    /// Statements sent to PostgreSQL (`BEGIN` and `COMMIT` included) and transactions.
    let databaseRoundTrips: Counter
    let databaseTransactions: Counter

    struct StorageCalls: Sendable {
        let put: Counter
        let get: Counter
        let head: Counter
        let list: Counter
        let delete: Counter
    }

    /// Upload latencies from 5 ms (a key slot on a local disk) to 2 minutes (a 128 MiB
    /// pack over a slow link).
    static let uploadBuckets: [Double] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    public init() {
        let r = registry
        bytesReceived = r.makeCounter(
            descriptor: Self.name("http", "received_bytes", "total", "Bytes of request bodies received."))
        bytesSent = r.makeCounter(
            descriptor: Self.name("http", "sent_bytes", "total", "Bytes of response bodies sent."))
        var histograms: [FileKind: ValueHistogram] = [:]
        for kind in [FileKind.pack, .snapshot, .key, .config] {
            histograms[kind] = r.makeValueHistogram(
                descriptor: Self.name(
                    "upload", "duration", "seconds",
                    "Seconds from an upload's request to its answer, stored uploads only."
                ), labels: [("kind", "\(kind)")], buckets: Self.uploadBuckets)
        }
        uploadSeconds = histograms
        quotaRefusals = r.makeCounter(
            descriptor: Self.name(
                "quota", "refusals", "total", "Uploads refused because the space's quota would be exceeded."))
        leasesGranted = r.makeCounter(
            descriptor: Self.name(
                "lock", "leases_granted", "total", "Lock leases granted (granted - released: held or lapsed)."))
        leasesReleased = r.makeCounter(
            descriptor: Self.name("lock", "leases_released", "total", "Lock leases released."))
        leasesRenewed = r.makeCounter(descriptor: Self.name("lock", "leases_renewed", "total", "Lock leases renewed."))
        func storage(_ operation: String) -> Counter {
            r.makeCounter(
                descriptor: Self.name(
                    "storage", "calls", "total",
                    "Calls to the spaces' storage (over S3, one request each; a listing one per 1000 names)."),
                labels: [("operation", operation)])
        }
        storageCalls = StorageCalls(
            put: storage("put"), get: storage("get"), head: storage("head"), list: storage("list"),
            delete: storage("delete"))
        databaseRoundTrips = r.makeCounter(
            descriptor: Self.name(
                "database", "round_trips", "total", "Statements sent to the shared database, BEGIN and COMMIT included."
            ),
            labels: [("store", "postgresql")])
        databaseTransactions = r.makeCounter(
            descriptor: Self.name("database", "transactions", "total", "Transactions run on the shared database."),
            labels: [("store", "postgresql")])
    }

    /// `cabackup_SUBSYSTEM_METRIC_UNIT`.
    private static func name(
        _ subsystem: String, _ metric: String, _ unit: String, _ help: String
    )
        -> MetricNameDescriptor
    {
        MetricNameDescriptor(
            namespace: "cabackup", subsystem: subsystem, metricName: metric, unitName: unit, helpText: help)
    }

    private static let methods: Set<HTTPRequest.Method> = [.get, .head, .put, .post, .delete]

    /// The counter of requests to `route` (its pattern, `unmatched` for none) answered
    /// with `status`. Methods other than the API's are counted as `other`.
    func requests(route: String, method: HTTPRequest.Method, status: Int) -> Counter {
        registry.makeCounter(
            descriptor: Self.name(
                "http", "requests", "total", "Requests answered, by route pattern, method and status code."),
            labels: [
                ("route", route), ("method", Self.methods.contains(method) ? method.rawValue : "other"),
                ("status", String(status)),
            ])
    }

    /// Records a stored upload of `kind` that took `seconds`.
    func uploaded(_ kind: FileKind, seconds: Double) {
        uploadSeconds[kind]?.record(seconds)
    }

    /// The text `GET /metrics` answers.
    func exposition() -> [UInt8] { registry.emitToBuffer() }
}

/// Counts every request by route and status, and logs it (method, path, status; never
/// headers or bodies, so no token reaches the log). The route is the router's pattern
/// (`/v1/space/packs/{name}`), which the router sets once it has matched the request.
struct RequestMetrics: RouterMiddleware {
    typealias Context = ServerContext
    let metrics: ServerMetrics
    let logger: Logger

    func handle(
        _ request: Request, context: ServerContext, next: (Request, ServerContext) async throws -> Response
    ) async throws -> Response {
        let start = ContinuousClock.now
        let status: Int
        let response: Response
        do {
            response = try await next(request, context)
            status = Int(response.status.code)
        } catch {
            status = Int((error as? any HTTPResponseError)?.status.code ?? 500)
            record(request, context: context, status: status, since: start)
            throw error
        }
        record(request, context: context, status: status, since: start)
        return response
    }

    private func record(_ request: Request, context: ServerContext, status: Int, since start: ContinuousClock.Instant) {
        let path = context.endpointPath
        let route = path == nil || path == "NotFound" ? "unmatched" : path!
        metrics.requests(route: route, method: request.method, status: status).increment()
        let ms = Int((ContinuousClock.now - start).inSeconds * 1000)
        logger.info(
            "\(request.method) \(request.uri.path) \(status)",
            metadata: [
                "method": "\(request.method)", "route": "\(route)", "status": .stringConvertible(status),
                "ms": .stringConvertible(ms),
            ])
    }
}

extension Duration {
    var inSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}

/// Counts the bytes of request and response bodies on one connection, as they pass.
final class BodyByteCounter: ChannelDuplexHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = HTTPRequestPart
    typealias InboundOut = HTTPRequestPart
    typealias OutboundIn = HTTPResponsePart
    typealias OutboundOut = HTTPResponsePart

    let metrics: ServerMetrics

    init(_ metrics: ServerMetrics) { self.metrics = metrics }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        if case .body(let buffer) = unwrapInboundIn(data) {
            metrics.bytesReceived.increment(by: Int64(buffer.readableBytes))
        }
        context.fireChannelRead(data)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if case .body(let buffer) = unwrapOutboundIn(data) {
            metrics.bytesSent.increment(by: Int64(buffer.readableBytes))
        }
        context.write(data, promise: promise)
    }
}

/// A storage that counts each call to the one it wraps in ``ServerMetrics/storageCalls``.
final class MeteredStorage: Storage {
    let base: any Storage
    let calls: ServerMetrics.StorageCalls

    init(_ base: any Storage, calls: ServerMetrics.StorageCalls) {
        self.base = base
        self.calls = calls
    }

    var location: String { base.location }
    var capabilities: StorageCapabilities { base.capabilities }
    var workingDirectory: String? { base.workingDirectory }
    var space: (any SpaceServices)? { base.space }
    func create() throws { try base.create() }
    func checkCanCreate() throws { try base.checkCanCreate() }
    func missingRepositoryError() -> CABackupError { base.missingRepositoryError() }
    func nativeLock(exclusive: Bool) throws -> RepositoryLock? { try base.nativeLock(exclusive: exclusive) }

    func list(_ kind: FileKind) throws -> [String] {
        calls.list.increment()
        return try base.list(kind)
    }

    func stat(_ kind: FileKind, _ name: String) throws -> Int64? {
        calls.head.increment()
        return try base.stat(kind, name)
    }

    func read(_ kind: FileKind, _ name: String) throws -> [UInt8] {
        calls.get.increment()
        return try base.read(kind, name)
    }

    func read(
        _ kind: FileKind, _ name: String, offset: Int64, length: Int, into buffer: UnsafeMutableRawPointer
    ) throws {
        calls.get.increment()
        try base.read(kind, name, offset: offset, length: length, into: buffer)
    }

    func put(_ kind: FileKind, _ name: String, bytes: UnsafeRawBufferPointer) throws {
        calls.put.increment()
        try base.put(kind, name, bytes: bytes)
    }

    func put(_ kind: FileKind, _ name: String, file path: String) throws {
        calls.put.increment()
        try base.put(kind, name, file: path)
    }

    func remove(_ kind: FileKind, _ name: String) throws {
        calls.delete.increment()
        try base.remove(kind, name)
    }
}

/// Serves `GET /metrics` (and nothing else) on its own address, so the API's port never
/// shows the counters and the metrics port never serves the API.
func metricsApplication(
    _ metrics: ServerMetrics, host: String, port: Int, logger: Logger,
    onListening: @escaping @Sendable (String) -> Void
) -> some Service {
    let router = Router()
    router.get("/metrics") { _, _ in
        Response(
            status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: metrics.exposition())))
    }
    return Application(
        router: router,
        configuration: ApplicationConfiguration(address: .hostname(host, port: port), serverName: nil),
        onServerRunning: { channel in
            let port = channel.localAddress?.port ?? port
            onListening("http://\(host.contains(":") ? "[\(host)]" : host):\(port)/metrics")
        }, logger: logger)
}
