import CABackup
import CABackupRemote
import Dispatch
import Foundation
import HTTPTypes
import Hummingbird
import NIOCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// The JSON API under `/api` and the page's routes (documented in `docs/ui.md`).
final class UIAPI: Sendable {
    let options: UIOptions
    let access: Access
    let jobs = Jobs()
    /// The configuration as last written, and each configured repository's worker.
    private let state: Mutex<(config: DeviceConfiguration, workers: [String: RepositoryWorker])>
    /// Changes to the configuration file, one at a time, off the event loops.
    private let configQueue = DispatchQueue(label: "cabackup.ui.config")
    /// Most entries a change set or a search answers with.
    static let maxEntries = 1000

    init(options: UIOptions, config: DeviceConfiguration, access: Access) {
        self.options = options
        self.access = access
        let workers = Dictionary(
            uniqueKeysWithValues: config.repositories.map { ($0.name, RepositoryWorker(name: $0.name)) })
        state = Mutex((config, workers))
    }

    func install(on router: Router<BasicRequestContext>) {
        router.get("/") { _, _ in Assets.response(Assets.page, type: "text/html; charset=utf-8") }
        router.get("/app.js") { _, _ in Assets.response(Assets.script, type: "text/javascript; charset=utf-8") }
        router.get("/app.css") { _, _ in Assets.response(Assets.style, type: "text/css; charset=utf-8") }
        router.get("/locked") { _, _ in
            Assets.response(
                "Not logged in. Open \(self.access.file) in your browser: it holds this run's link.\n",
                type: "text/plain; charset=utf-8", status: 401)
        }
        router.get("/login") { req, _ in
            guard self.access.isToken(req.uri.queryParameters.get("token") ?? "") else {
                return errorResponse(
                    403, "wrong token: open \(self.access.file) again (the token changes at each start)")
            }
            let cookie = "\(Access.cookieName)=\(self.access.newSession()); HttpOnly; SameSite=Strict; Path=/"
            // A page that goes on to / itself rather than a redirect: the access file is a
            // file:// page, so a redirect would stay in its cross-site navigation, and the
            // browser would not send the SameSite=Strict cookie with it.
            var response = Assets.response(Assets.loggedIn, type: "text/html; charset=utf-8")
            response.headers[.setCookie] = cookie
            return response
        }
        router.get("/api/repositories") { _, _ in
            jsonResponse(
                200, self.state.withLock { s in s.config.repositories.map { self.answer($0, s.workers[$0.name]) } })
        }
        router.post("/api/repositories") { req, _ in await self.handle { try await self.add(req) } }
        router.post("/api/accounts") { req, _ in await self.handle { try await self.account(req) } }
        router.post("/api/s3") { req, _ in await self.handle { try await self.s3(req) } }
        router.post("/api/repositories/:name/unlock") { req, ctx in
            await self.handle {
                let (entry, worker) = try self.repository(ctx)
                struct Unlock: Decodable { let password: String? }
                let body = try await self.decode(Unlock.self, req)
                try await worker.unlock(location: entry.repo, password: body.password, initialize: nil)
                return jsonResponse(200, self.answer(entry, worker))
            }
        }
        router.delete("/api/repositories/:name/unlock") { _, ctx in
            await self.handle {
                let (entry, worker) = try self.repository(ctx)
                await worker.lock()
                return jsonResponse(200, self.answer(entry, worker))
            }
        }
        router.get("/api/repositories/:name/snapshots") { _, ctx in
            await self.handle {
                let (_, worker) = try self.repository(ctx)
                return jsonResponse(
                    200,
                    try await worker.run { repo in
                        try repo.synchronizeIndex()
                        return try repo.snapshots().map(SnapshotAnswer.init)
                    })
            }
        }
        router.get("/api/repositories/:name/changes") { req, ctx in
            await self.handle {
                let (entry, worker) = try self.repository(ctx)
                if req.uri.queryParameters.get("cached") == "1" {
                    guard let last = worker.lastCheck.withLock({ $0 }) else { return Response(status: .noContent) }
                    return jsonResponse(200, last)
                }
                return jsonResponse(200, try await self.check(entry, worker))
            }
        }
        router.post("/api/repositories/:name/sync") { _, ctx in
            await self.handle {
                let (entry, worker) = try self.repository(ctx)
                try Self.requireUnlocked(worker)
                return jsonResponse(202, ["job": self.sync(entry, worker)])
            }
        }
        router.get("/api/repositories/:name/snapshots/:id/tree") { req, ctx in
            await self.handle { try await self.tree(req, ctx) }
        }
        router.get("/api/repositories/:name/find") { req, ctx in
            await self.handle { try await self.find(req, ctx) }
        }
        router.get("/api/repositories/:name/snapshots/:id/download") { req, ctx in
            await self.handle { try await self.download(req, ctx) }
        }
        router.post("/api/repositories/:name/restore") { req, ctx in
            await self.handle { try await self.restore(req, ctx) }
        }
        router.get("/api/repositories/:name/devices") { _, ctx in
            await self.handle {
                let space = try self.serverSpace(ctx)
                let list = try await Self.offLoop {
                    try RemoteAccount.devices(server: space.serverURL, user: space.user)
                }
                return jsonResponse(200, list.map(DeviceAnswer.init))
            }
        }
        router.delete("/api/repositories/:name/devices/:id") { _, ctx in
            await self.handle {
                let space = try self.serverSpace(ctx)
                let id = ctx.parameters.get("id") ?? ""
                guard !id.isEmpty, id.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
                    throw UIError(400, "the device id '\(id)' is not one the device list shows")
                }
                try await Self.offLoop {
                    try RemoteAccount.revoke(server: space.serverURL, user: space.user, device: id)
                }
                return Response(status: .noContent)
            }
        }
        router.get("/api/repositories/:name/usage") { _, ctx in
            await self.handle {
                let space = try self.serverSpace(ctx)
                return jsonResponse(
                    200, try await Self.offLoop { try RemoteAccount.usage(server: space.serverURL, user: space.user) })
            }
        }
        router.get("/api/jobs/:id") { _, ctx in
            await self.handle {
                guard let job = self.jobs.status(ctx.parameters.get("id") ?? "") else {
                    throw UIError(404, "no such job")
                }
                return jsonResponse(200, job)
            }
        }
    }

    /// Runs a route, answering every error as `{"error": …}`.
    func handle(_ body: () async throws -> Response) async -> Response {
        do {
            return try await body()
        } catch let e as UIError {
            return errorResponse(e.status, e.message)
        } catch let e as CABackupError {
            let e = UIError(e)
            return errorResponse(e.status, e.message)
        } catch {
            return errorResponse(500, "\(error)")
        }
    }

    func decode<T: Decodable>(_ type: T.Type, _ req: Request) async throws -> T {
        var req = req
        let buffer: ByteBuffer
        do {
            buffer = try await req.collectBody(upTo: 1 << 20)
        } catch {
            throw UIError(413, "the request body is larger than 1 MiB")
        }
        do {
            return try JSONDecoder().decode(T.self, from: Data(buffer.readableBytesView))
        } catch {
            throw UIError(400, "malformed JSON body: see docs/ui.md for the fields")
        }
    }

    /// The configured repository the route's `:name` names, and its worker.
    func repository(_ ctx: BasicRequestContext) throws -> (ConfiguredRepository, RepositoryWorker) {
        let name = ctx.parameters.get("name") ?? ""
        return try state.withLock { s in
            guard let entry = s.config.repositories.first(where: { $0.name == name }), let worker = s.workers[name]
            else { throw UIError(404, "no repository named '\(name)' is configured") }
            return (entry, worker)
        }
    }

    struct RepositoryAnswer: Encodable {
        let name: String
        let repo: String
        let paths: [String]
        let every: String?
        let exclude: [String]
        let unlocked: Bool
        let lastCheck: String?
    }

    func answer(_ entry: ConfiguredRepository, _ worker: RepositoryWorker?) -> RepositoryAnswer {
        RepositoryAnswer(
            name: entry.name, repo: entry.repo, paths: entry.paths, every: entry.every, exclude: entry.exclude ?? [],
            unlocked: worker?.unlocked ?? false, lastCheck: worker?.lastCheck.withLock { $0?.checkedAt })
    }

    // MARK: Configuration

    func add(_ req: Request) async throws -> Response {
        struct Add: Decodable {
            let name: String
            let repo: String
            let paths: [String]
            let every: String?
            let exclude: [String]?
            let initialize: Bool?
            let password: String?
            enum CodingKeys: String, CodingKey {
                case name, repo, paths, every, exclude, password
                case initialize = "init"
            }
        }
        let body = try await decode(Add.self, req)
        let entry = ConfiguredRepository(
            name: body.name, repo: body.repo, paths: body.paths, every: body.every, exclude: body.exclude)
        if let problem = entry.problem() { throw UIError(400, problem) }
        if state.withLock({ s in s.config.repositories.contains { $0.name == entry.name } }) {
            throw UIError(400, "a repository named '\(entry.name)' is already configured")
        }
        let worker = RepositoryWorker(name: entry.name)
        if body.initialize == true {
            guard let password = body.password, !password.isEmpty else {
                throw UIError(400, "give a password for the new repository")
            }
            try await worker.unlock(location: entry.repo, password: password, initialize: options.kdf)
        } else if let password = body.password {
            // An existing repository with its password: opened first, so a wrong password
            // or location adds nothing.
            try await worker.unlock(location: entry.repo, password: password, initialize: nil)
        }
        try await changeConfiguration { config in
            guard !config.repositories.contains(where: { $0.name == entry.name }) else {
                throw UIError(400, "a repository named '\(entry.name)' is already configured")
            }
            config.repositories.append(entry)
        } then: { workers in
            workers[entry.name] = worker
        }
        return jsonResponse(201, answer(entry, worker))
    }

    /// Changes the configuration and writes it (one change at a time), then updates the
    /// workers.
    func changeConfiguration(
        _ change: @escaping @Sendable (inout DeviceConfiguration) throws -> Void,
        then: @escaping @Sendable (inout [String: RepositoryWorker]) -> Void
    ) async throws {
        let path = options.configPath
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            configQueue.async {
                continuation.resume(
                    with: Result {
                        var config = self.state.withLock { $0.config }
                        try change(&config)
                        try config.save(path)
                        self.state.withLock {
                            $0.config = config
                            then(&$0.workers)
                        }
                    })
            }
        }
    }

    // MARK: Server accounts

    /// Registers an account on a server (with `register`) and logs this device in to it, as
    /// `cabackup register` and `cabackup login` do: the token goes to the CLI's credential
    /// store, the password nowhere. Answers the repository location of the account's space.
    func account(_ req: Request) async throws -> Response {
        struct Body: Decodable {
            let server: String
            let user: String
            let password: String
            let email: String?
            let register: Bool?
            let device: String?
        }
        struct Answer: Encodable {
            let server: String
            let user: String
            let registered: Bool
            let repo: String
        }
        let body = try await decode(Body.self, req)
        let location: RemoteLocation
        do {
            location = try RemoteLocation(parsing: body.server, requireUser: false)
        } catch {
            throw UIError(400, "the server '\(body.server)' is not an http(s)://HOST:PORT address")
        }
        let register = body.register ?? false
        if register && (body.email ?? "").isEmpty { throw UIError(400, "give an e-mail address to register") }
        // The account calls block on the network: on a thread of their own, off the event loop.
        try await Self.offLoop {
            try RemoteAccount.checkUserName(body.user)
            if register {
                try RemoteAccount.register(
                    server: body.server, user: body.user, email: body.email ?? "", password: body.password)
            }
            try RemoteAccount.login(
                server: body.server, user: body.user, password: body.password, device: body.device ?? currentHostname())
        }
        let host = location.serverURL.dropFirst(location.scheme.count + 3)
        return jsonResponse(
            200,
            Answer(
                server: location.serverURL, user: body.user, registered: register,
                repo: "\(location.scheme)://\(body.user)@\(host)"))
    }

    /// The server space the route's `:name` names; 400 for a repository of another kind.
    func serverSpace(_ ctx: BasicRequestContext) throws -> RemoteLocation {
        let (entry, _) = try repository(ctx)
        guard entry.repo.hasPrefix("http://") || entry.repo.hasPrefix("https://"),
            let location = try? RemoteLocation(parsing: entry.repo)
        else { throw UIError(400, "the repository '\(entry.name)' is not a server space") }
        return location
    }

    /// Runs a blocking network call on a thread of its own, off the event loop.
    static func offLoop<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { (done: CheckedContinuation<T, Error>) in
            Thread.detachNewThread { done.resume(with: Result { try body() }) }
        }
    }

    // MARK: S3 buckets

    /// Stores an S3 bucket's keys where the CLI reads them (``S3CredentialStore``: 0600, in
    /// the cabackup config directory) and answers the repository location to add.
    func s3(_ req: Request) async throws -> Response {
        struct Body: Decodable {
            let endpoint: String
            let bucket: String
            let prefix: String?
            let region: String?
            let accessKeyId: String
            let secretAccessKey: String
        }
        struct Answer: Encodable {
            let repo: String
            let endpoint: String
            let bucket: String
            let region: String
        }
        let body = try await decode(Body.self, req)
        let endpoint = body.endpoint.trimmingCharacters(in: .whitespaces).trimmingCharacters(in: ["/"])
        guard endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://"),
            endpoint.dropFirst(endpoint.hasPrefix("https") ? 8 : 7).allSatisfy({ $0 != "/" && $0 != "@" })
        else { throw UIError(400, "the endpoint '\(body.endpoint)' is not an http(s)://HOST[:PORT] address") }
        let prefix = (body.prefix ?? "").split(separator: "/").joined(separator: "/")
        let location: S3Location
        do {
            location = try S3Location(
                parsing: "s3:\(endpoint)/\(body.bucket)" + (prefix.isEmpty ? "" : "/" + prefix))
        } catch let e as CABackupError {
            throw UIError(e)
        }
        let region = (body.region ?? "").trimmingCharacters(in: .whitespaces)
        guard !body.accessKeyId.isEmpty, !body.secretAccessKey.isEmpty else {
            throw UIError(400, "give the access key id and the secret access key")
        }
        guard region.isEmpty || region.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) else {
            throw UIError(400, "the region '\(region)' is not a region name such as eu-central-1")
        }
        let credentials = S3Credentials(
            accessKeyId: body.accessKeyId, secretAccessKey: body.secretAccessKey, region: region.isEmpty ? nil : region)
        try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, Error>) in
            configQueue.async { done.resume(with: Result { try S3CredentialStore.store(credentials, for: location) }) }
        }
        return jsonResponse(
            200,
            Answer(
                repo: location.description, endpoint: location.endpoint, bucket: location.bucket,
                region: region.isEmpty ? "us-east-1" : region))
    }

    // MARK: Changes and sync

    /// Checks what changed in the repository's paths since their last snapshot.
    func check(_ entry: ConfiguredRepository, _ worker: RepositoryWorker) async throws -> ChangesAnswer {
        let changes = try await worker.run { repo in
            try repo.synchronizeIndex()
            return try repo.status(paths: entry.paths, options: StatusOptions(excludes: entry.exclude ?? []))
        }
        let answer = ChangesAnswer(changes)
        worker.lastCheck.withLock { $0 = answer }
        return answer
    }

    /// Starts the checks the schedule says are due, on unlocked repositories.
    func startDueChecks() {
        let now = monotonicSeconds()
        let due = state.withLock { s in
            s.config.repositories.compactMap { entry -> (ConfiguredRepository, RepositoryWorker)? in
                guard let interval = entry.interval, let worker = s.workers[entry.name], worker.unlocked,
                    !worker.scheduledCheckRunning.load(ordering: .relaxed)
                else { return nil }
                return worker.lastScheduled.withLock { last in
                    if let last, now - last < interval { return nil }
                    last = now
                    worker.scheduledCheckRunning.store(true, ordering: .relaxed)
                    return (entry, worker)
                }
            }
        }
        for (entry, worker) in due {
            Task {
                if let answer = try? await self.check(entry, worker) { Self.notifyIfNew(entry, worker, answer) }
                worker.scheduledCheckRunning.store(false, ordering: .relaxed)
            }
        }
    }

    /// Sends a desktop notification with `notify-send` (when it is on PATH) for a change set
    /// a scheduled check found, once per change set: the same changes found again are not
    /// announced again, and a check that finds nothing forgets the last one.
    static func notifyIfNew(_ entry: ConfiguredRepository, _ worker: RepositoryWorker, _ c: ChangesAnswer) {
        let counts = [c.added, c.removed, c.modified, c.metadataOnly]
        let key: String? =
            counts.allSatisfy({ $0 == 0 })
            ? nil
            : ([c.base ?? "-"] + counts.map(String.init)
                + c.entries.map { "\($0.change) \($0.size) \($0.path)" }).joined(separator: "\n")
        let isNew = worker.lastNotified.withLock { last in
            defer { last = key }
            return key != nil && key != last
        }
        guard isNew, let tool = findOnPath("notify-send") else { return }
        let body =
            "\(entry.name) (\(entry.repo)): \(c.added) added, \(c.removed) removed, \(c.modified) modified, "
            + "\(c.metadataOnly) metadata only; \(c.filesToSync) files (\(c.bytesToSync) bytes) to sync. "
            + "Open cabackup ui to sync them."
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = ["--app-name=cabackup", "cabackup: changes to back up", body]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        Thread.detachNewThread {
            // A notify-send that fails (no D-Bus session) changes nothing: the page shows it too.
            guard (try? process.run()) != nil else { return }
            process.waitUntilExit()
        }
    }

    /// The executable `name` in a directory of PATH, or nil.
    static func findOnPath(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") where !directory.isEmpty {
            let candidate = "\(directory)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    /// Starts a snapshot of the repository's paths as a job; returns its id.
    func sync(_ entry: ConfiguredRepository, _ worker: RepositoryWorker) -> String {
        let jobs = self.jobs
        let id = jobs.start(kind: "sync", repository: entry.name, location: entry.repo)
        jobs.run(id, on: worker) { repo in
            try repo.synchronizeIndex()
            let result = try repo.snapshot(
                paths: entry.paths, options: SnapshotOptions(excludes: entry.exclude ?? []),
                progress: { jobs.record(id, $0) })
            jobs.update(id) {
                $0.files = result.snapshot.summary.filesTotal
                $0.bytes = result.snapshot.summary.bytesTotal + result.snapshot.summary.bytesUnchanged
                $0.totalBytes = $0.bytes
            }
            return (result.snapshot.id.hex, result.warnings.map(\.description))
        }
        return id
    }

    /// Throws 423 for a repository not unlocked yet, so that a job is not started only to
    /// fail.
    static func requireUnlocked(_ worker: RepositoryWorker) throws {
        guard worker.unlocked else { throw UIError.locked(worker.name) }
    }

    // MARK: Browsing

    func tree(_ req: Request, _ ctx: BasicRequestContext) async throws -> Response {
        let (_, worker) = try repository(ctx)
        let reference = ctx.parameters.get("id") ?? ""
        let path = req.uri.queryParameters.get("path") ?? "/"
        guard path.hasPrefix("/") else { throw UIError(400, "path must be absolute") }
        return jsonResponse(
            200,
            try await worker.run { repo in
                let snapshot = try repo.findSnapshot(reference)
                let node = try Self.node(repo, snapshot, path)
                guard node.type == .directory else { throw UIError(400, "\(path) is not a directory") }
                let base = absolutePath(path) == "/" ? "" : absolutePath(path)
                return TreeAnswer(
                    snapshot: snapshot.id.hex, path: absolutePath(path),
                    entries: try repo.loadDirectory(node).map { TreeAnswer.Entry($0, parent: base) })
            })
    }

    /// The node at `path` of `snapshot`; for `/`, a directory holding its root tree.
    static func node(_ repo: Repository, _ snapshot: Snapshot, _ path: String) throws -> Node {
        guard absolutePath(path) != "/" else {
            var root = Node(name: [], type: .directory)
            root.subtrees = [snapshot.tree]
            root.mode = 0o755
            return root
        }
        return try repo.entry(in: snapshot, at: path).node
    }

    func find(_ req: Request, _ ctx: BasicRequestContext) async throws -> Response {
        let (_, worker) = try repository(ctx)
        guard let pattern = req.uri.queryParameters.get("pattern"), !pattern.isEmpty else {
            throw UIError(400, "give ?pattern=GLOB, for example *.jpg")
        }
        return jsonResponse(
            200,
            try await worker.run { repo in
                try repo.synchronizeIndex()
                let snapshots = try repo.snapshots()
                let byID = Dictionary(snapshots.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
                let found = try repo.find(pattern, in: snapshots)
                return FindAnswer(
                    matches: found.prefix(Self.maxEntries).compactMap { f in
                        byID[f.snapshot].map { FindAnswer.Match(f, snapshot: $0) }
                    }, truncated: found.count > Self.maxEntries)
            })
    }

    /// A file's bytes, or a directory (or with `archive=tar` anything) as a tar stream (with
    /// `archive=zip` a zip archive):
    /// `Repository.dump` writes into a pipe on the repository's thread, and the response
    /// body is read from the pipe, 64 KiB at a time, as the connection takes it.
    func download(_ req: Request, _ ctx: BasicRequestContext) async throws -> Response {
        let (_, worker) = try repository(ctx)
        let reference = ctx.parameters.get("id") ?? ""
        guard let path = req.uri.queryParameters.get("path"), path.hasPrefix("/") else {
            throw UIError(400, "give ?path=/absolute/path/in/the/snapshot")
        }
        let archive: DumpFormat =
            switch req.uri.queryParameters.get("archive") {
            case "tar": .tar
            case "zip": .zip
            case nil: .auto
            case let other?: throw UIError(400, "archive=\(other): give archive=tar or archive=zip")
            }
        let (snapshot, node) = try await worker.run { repo in
            let snapshot = try repo.findSnapshot(reference)
            return (snapshot, try Self.node(repo, snapshot, path))
        }
        let isZip = archive == .zip
        let isTar = archive == .tar || (archive == .auto && node.type == NodeType.directory)
        if !isTar && !isZip && node.type != NodeType.file {
            throw UIError(400, "\(path) is a \(node.type): download its directory")
        }
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw UIError(500, "cannot make a pipe: \(String(cString: strerror(errno)))") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        let (reader, writer) = (fds[0], fds[1])
        let failure = Mutex<String?>(nil)
        Task {
            do {
                try await worker.run { repo in
                    defer { close(writer) }
                    try repo.dump(snapshot, path: path, archive: archive, to: writer)
                }
            } catch {
                failure.withLock { $0 = "\(error)" }
            }
        }
        var name = node.name.isEmpty ? "snapshot-\(snapshot.id.shortHex)" : displayPath(node.name)
        if isTar { name += ".tar" }
        if isZip { name += ".zip" }
        let safe = String(
            name.unicodeScalars.map { c in
                Character(c.properties.isAlphabetic || "0123456789._-".unicodeScalars.contains(c) ? c : "_")
            })
        let headers: HTTPFields = [
            .contentType: isZip ? "application/zip" : isTar ? "application/x-tar" : "application/octet-stream",
            .contentDisposition: "attachment; filename=\"\(safe)\"",
        ]
        let body = ResponseBody { out in
            defer { close(reader) }
            while true {
                let piece = try await Self.readPiece(reader)
                if piece.readableBytes == 0 { break }
                try await out.write(piece)
            }
            // The stream ended: cut the response short if the dump failed, so the client
            // sees an incomplete download rather than a short file.
            if let message = failure.withLock({ $0 }) { throw UIError(500, message) }
            try await out.finish(nil)
        }
        return Response(status: .ok, headers: headers, body: body)
    }

    /// Up to 64 KiB from `fd`, read on a thread that may block; empty at the end.
    static func readPiece(_ fd: Int32) async throws -> ByteBuffer {
        try await withCheckedThrowingContinuation { continuation in
            DispatchQueue.global().async {
                var buffer = ByteBufferAllocator().buffer(capacity: 64 << 10)
                let n = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 64 << 10) { raw in
                    var n = -1
                    repeat { n = Glibc.read(fd, raw.baseAddress, raw.count) } while n < 0 && errno == EINTR
                    return max(n, 0)
                }
                _ = n
                continuation.resume(returning: buffer)
            }
        }
    }

    func restore(_ req: Request, _ ctx: BasicRequestContext) async throws -> Response {
        let (entry, worker) = try repository(ctx)
        struct Restore: Decodable {
            let snapshot: String
            let path: String
            let target: String
            let overwrite: Bool?
        }
        try Self.requireUnlocked(worker)
        let body = try await decode(Restore.self, req)
        guard body.path.hasPrefix("/") else { throw UIError(400, "path must be an absolute path in the snapshot") }
        guard body.target.hasPrefix("/") else { throw UIError(400, "target must be an absolute directory") }
        let jobs = self.jobs
        let id = jobs.start(kind: "restore", repository: entry.name, location: entry.repo)
        jobs.run(id, on: worker) { repo in
            let snapshot = try repo.findSnapshot(body.snapshot)
            let options = RestoreOptions(
                includes: absolutePath(body.path) == "/" ? [] : [body.path], overwrite: body.overwrite ?? false)
            let result = try repo.restore(
                snapshot, to: body.target, options: options, progress: { jobs.record(id, $0) },
                events: { event in
                    if case .selected(_, let size) = event { jobs.update(id) { $0.totalBytes += size } }
                })
            jobs.update(id) {
                $0.files = result.filesRestored
                $0.bytes = result.bytesWritten
            }
            if let first = result.failures.first {
                throw UIError(500, "\(result.failures.count) entries could not be restored, first \(first)")
            }
            return (nil, result.warnings.map(\.description))
        }
        return jsonResponse(202, ["job": id])
    }
}

/// What `GET /api/repositories/NAME/changes` answers.
struct ChangesAnswer: Codable, Sendable {
    struct Entry: Codable, Sendable {
        /// `+` added, `-` removed, `M` modified, `U` metadata only.
        let change: String
        let path: String
        let size: UInt64
        let type: String
    }

    let checkedAt: String
    let base: String?
    let added: Int
    let removed: Int
    let modified: Int
    let metadataOnly: Int
    let filesToSync: Int
    let bytesToSync: UInt64
    let entries: [Entry]
    let truncated: Bool

    init(_ c: ChangeSet) {
        checkedAt = formatRFC3339(ns: wallClockNs())
        base = c.base?.hex
        (added, removed, modified, metadataOnly) = (
            c.added.count, c.removed.count, c.modified.count, c.metadataOnly.count
        )
        (filesToSync, bytesToSync) = (c.filesToSync, c.bytesToSync)
        let all =
            [("+", c.added), ("-", c.removed), ("M", c.modified), ("U", c.metadataOnly)].lazy.flatMap { change, list in
                list.lazy.map { Entry(change: change, path: $0.displayPath, size: $0.size, type: $0.type.description) }
            }
        entries = Array(all.prefix(UIAPI.maxEntries))
        truncated = added + removed + modified + metadataOnly > UIAPI.maxEntries
    }
}

/// One device of `GET /api/repositories/NAME/devices`.
struct DeviceAnswer: Encodable, Sendable {
    let id: String
    let device: String
    let created: String
    let lastUsed: String
    /// Whether this is the token of this device (of `cabackup ui`).
    let current: Bool
    /// `full` or `append-only`.
    let rights: String

    init(_ d: DeviceInfo) {
        (id, device, created, lastUsed, current, rights) = (d.id, d.device, d.created, d.lastUsed, d.current, d.rights)
    }
}

/// One snapshot of `GET /api/repositories/NAME/snapshots`.
struct SnapshotAnswer: Encodable, Sendable {
    let id: String
    let shortId: String
    let time: String
    let host: String
    let paths: [String]
    let tags: [String]
    let bytesAdded: Int64
    let filesNewOrChanged: Int
    let filesTotal: Int
    let bytesTotal: Int64

    init(_ s: Snapshot) {
        (id, shortId, time, host, paths, tags) = (s.id.hex, s.id.shortHex, s.time, s.hostname, s.paths, s.tags)
        bytesAdded = s.summary.bytesAdded
        filesNewOrChanged = s.summary.filesTotal - s.summary.filesUnchanged
        filesTotal = s.summary.filesTotal
        bytesTotal = s.summary.bytesTotal + s.summary.bytesUnchanged
    }
}

/// A directory of a snapshot.
struct TreeAnswer: Encodable, Sendable {
    struct Entry: Encodable, Sendable {
        let name: String
        let path: String
        let type: String
        let size: UInt64
        let mtime: String
        /// Permission bits in octal, `0644`.
        let mode: String

        init(_ n: Node, parent: String) {
            name = n.displayName
            path = parent + "/" + n.displayName
            type = n.type.description
            size = n.size
            mtime = formatRFC3339(ns: n.mtimeNs)
            mode = String(format: "%04o", n.mode)
        }
    }

    let snapshot: String
    let path: String
    let entries: [Entry]
}

/// The matches of `GET /api/repositories/NAME/find`.
struct FindAnswer: Encodable, Sendable {
    struct Match: Encodable, Sendable {
        let snapshot: String
        let shortId: String
        let time: String
        let path: String
        let type: String
        let size: UInt64
        let mtime: String

        init(_ f: FoundEntry, snapshot s: Snapshot) {
            (snapshot, shortId, time) = (s.id.hex, s.id.shortHex, s.time)
            (path, type, size, mtime) = (f.displayPath, f.type.description, f.size, formatRFC3339(ns: f.mtimeNs))
        }
    }

    let matches: [Match]
    let truncated: Bool
}
