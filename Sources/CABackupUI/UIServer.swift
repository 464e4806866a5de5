import CABackup
import CABackupRemote
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import ServiceLifecycle
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// How `cabackup ui` runs.
public struct UIOptions: Sendable {
    /// The loopback address to listen on: `127.0.0.1`, `localhost` or `::1`.
    public var host: String
    /// Port; 0 picks a free one.
    public var port: Int
    /// The device configuration file (``DeviceConfiguration``).
    public var configPath: String
    /// Where the access file goes: `$XDG_RUNTIME_DIR`, else the config directory.
    public var accessDirectory: String
    /// scrypt cost of the key slot of a repository created from the page.
    public var kdf: KDFParameters = .default
    /// Seconds between looks at which repositories are due a scheduled check.
    public var scheduleTick: Double = 1

    public init(host: String, port: Int, configPath: String, accessDirectory: String) {
        self.host = host
        self.port = port
        self.configPath = configPath
        self.accessDirectory = accessDirectory
    }

    /// Whether `host` is an address `cabackup ui` may listen on: loopback only.
    public static func isLoopback(_ host: String) -> Bool {
        ["127.0.0.1", "localhost", "::1", "[::1]"].contains(host)
    }

    /// `$XDG_RUNTIME_DIR` when set, else this user's cabackup config directory.
    public static var defaultAccessDirectory: String {
        if let d = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !d.isEmpty { return d }
        return configDirectory()
    }
}

/// A running `cabackup ui`: serve it with ``run(onListening:)``, stop it with ``stop()``.
public final class UIServer: Sendable {
    let options: UIOptions
    let access: Access
    let api: UIAPI
    private let group = Mutex<ServiceGroup?>(nil)

    /// Reads the device configuration.
    ///
    /// - Throws: ``CABackupError/invalidArgument(_:)`` for a bad file.
    public init(_ options: UIOptions) throws {
        self.options = options
        access = Access(directory: options.accessDirectory)
        api = UIAPI(options: options, config: try DeviceConfiguration.load(options.configPath), access: access)
    }

    /// Serves until ``stop()``. Once listening it writes the access file and calls
    /// `onListening` with the URL and that file's path; at the end it removes the file.
    public func run(onListening: @escaping @Sendable (_ url: String, _ accessFile: String) -> Void) async throws {
        let router = Router(context: BasicRequestContext.self)
        router.add(middleware: AccessMiddleware(access: access))
        api.install(on: router)
        // A job waiting out a network outage says so in its status (the page shows it).
        let jobs = api.jobs
        NetworkWaits.onWait { message in jobs.noteWait(message) }
        var logger = Logger(label: "cabackup.ui")
        logger.logLevel = .warning
        let host = options.host == "localhost" ? "127.0.0.1" : options.host.trimmingCharacters(in: ["[", "]"])
        let access = self.access
        let shown = host.contains(":") ? "[\(host)]" : host
        let app = Application(
            router: router,
            server: .http1(
                configuration: .init(
                    additionalChannelHandlers: [IdleStateHandler(allTimeout: Self.idleTimeout), CloseWhenIdle()])),
            configuration: .init(address: .hostname(host, port: options.port)),
            onServerRunning: { channel in
                access.port.store(channel.localAddress?.port ?? 0, ordering: .relaxed)
                let base = "http://\(shown):\(access.port.load(ordering: .relaxed))"
                do {
                    try access.writeFile(base: base)
                } catch {
                    FileHandle.standardError.write(Data("cabackup ui: cannot write the access file: \(error)\n".utf8))
                }
                onListening(base, access.file)
            }, logger: logger)
        let scheduler = Scheduler(api: api, tick: options.scheduleTick)
        let group = ServiceGroup(
            configuration: .init(
                services: [.init(service: scheduler), .init(service: app)], gracefulShutdownSignals: [],
                logger: logger))
        self.group.withLock { $0 = group }
        defer { access.removeFile() }
        try await group.run()
    }

    /// How long a connection may send and receive nothing before it is closed: a download
    /// whose client stopped reading holds its repository's thread until then. Long enough
    /// for a check of changes over a large tree, which answers only at its end.
    static let idleTimeout = TimeAmount.minutes(10)

    /// Stops serving: the requests in flight finish, then ``run(onListening:)`` returns.
    public func stop() {
        guard let group = group.withLock({ $0 }) else { return }
        Task { await group.triggerGracefulShutdown() }
    }
}

/// Checks the changes of every unlocked repository with `every`, on that schedule, while
/// the process runs.
struct Scheduler: Service {
    let api: UIAPI
    let tick: Double

    func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                api.startDueChecks()
                try? await Task.sleep(for: .seconds(tick))
            }
        }
    }
}

/// Closes a connection on which ``IdleStateHandler`` saw nothing move for the idle timeout.
final class CloseWhenIdle: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = NIOAny

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is IdleStateHandler.IdleStateEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// `{"error": message}` with `status`.
func errorResponse(_ status: Int, _ message: String) -> Response {
    struct Body: Encodable { let error: String }
    return jsonResponse(status, Body(error: message))
}

func jsonResponse(_ status: Int, _ value: some Encodable) -> Response {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    return Response(
        status: HTTPResponse.Status(code: status), headers: [.contentType: "application/json"],
        body: ResponseBody(byteBuffer: ByteBuffer(bytes: data)))
}
