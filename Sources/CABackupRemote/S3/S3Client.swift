import AsyncHTTPClient
import CABackup
import Foundation
import NIOCore
import NIOHTTP1
import Synchronization

/// A failure of an S3 call, after the retries it deserved.
package enum S3Error: Error, Sendable, CustomStringConvertible {
    /// The store answered with an error document (`<Error><Code>NoSuchKey</Code>…`), or a
    /// bare status when it sent none (HEAD answers have no body).
    case service(operation: String, status: Int, code: String, message: String)
    /// The store could not be reached, or stopped answering, on every attempt.
    case transport(operation: String, reason: String)
    /// The answer's body was longer than the call can legitimately receive.
    case answerTooLarge(operation: String, limit: Int)
    /// The answer was not what the call expects (XML that does not parse, a missing field).
    case malformedAnswer(operation: String, reason: String)

    /// Whether the key, or the bucket, does not exist.
    package var isNotFound: Bool {
        if case .service(_, let status, let code, _) = self {
            return status == 404 || code == "NoSuchKey" || code == "NoSuchBucket"
        }
        return false
    }

    /// The error code S3 gave (`NoSuchKey`, `SignatureDoesNotMatch`), if any.
    package var code: String? {
        if case .service(_, _, let code, _) = self { return code }
        return nil
    }

    package var description: String {
        switch self {
        case .service(let operation, let status, let code, let message):
            let advice =
                switch code {
                case "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied":
                    ": check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and the region"
                case "NoSuchBucket": ": create the bucket, or check its name"
                default: ""
                }
            return
                "S3 \(operation) failed with HTTP \(status) \(code)\(message.isEmpty ? "" : " (\(message))")\(advice)"
        case .transport(let operation, let reason):
            return "S3 \(operation): cannot reach the store (\(reason)); nothing was lost, run the command again"
        case .answerTooLarge(let operation, let limit):
            return
                "S3 \(operation): the store answered with more than \(limit) bytes, more than that call can legitimately return: it may be hostile"
        case .malformedAnswer(let operation, let reason):
            return "S3 \(operation): the store's answer is malformed (\(reason))"
        }
    }
}

/// One object as a listing or HEAD describes it.
package struct S3Object: Sendable, Equatable {
    /// The object's key, without the bucket.
    package var key: String
    /// The object's length in bytes.
    package var size: Int
    /// The entity tag, quotes removed (for a single PUT, the MD5 of the body in hex).
    package var etag: String
}

/// Blocking calls to an S3-compatible object store, for the engine's worker threads
/// (never called from an event loop): ListObjectsV2, HEAD, GET with an optional range,
/// PUT of bytes or of a file streamed from disk, DELETE and CreateBucket, each signed
/// with Signature Version 4.
///
/// Each call is retried, re-signed, on a 5xx answer (`503 SlowDown` included), on
/// `400 RequestTimeout` and on a transport error or timeout, at most ``maxAttempts``
/// times with exponential back-off; every other error answer becomes an ``S3Error``
/// carrying S3's code and message. Every answer body is capped at what the call can
/// legitimately receive.
package final class S3Client: Sendable {
    /// How the bucket is named in a request.
    package enum Addressing: Sendable {
        /// `http://host:port/bucket/key`: every S3-compatible store understands it.
        case path
        /// `http://bucket.host:port/key`: AWS's preferred form; needs DNS for the bucket name.
        case virtualHost
    }

    package let scheme: String
    /// The store's host, without the bucket.
    package let host: String
    /// The port, or nil for the scheme's default.
    package let port: Int?
    package let bucket: String
    package let addressing: Addressing
    package let signer: SigV4Signer
    /// Attempts per call, the first included.
    package let maxAttempts: Int
    /// The first back-off; each next one doubles, up to 8 s.
    package let backoff: Duration
    /// How long one attempt may take, the body's transfer included, before it counts as
    /// failed (and is retried).
    package let attemptTimeout: Duration
    /// The address connected to instead of the host name, like curl's `--resolve`.
    package let connectAddress: String?
    /// Shared by the process (``SharedHTTPClient``), so connections are pooled.
    private let client: HTTPClient
    /// When the store last answered a call of this client (see ``RetryPolicy``).
    private let lastAnswer = LastAnswer()

    /// The largest answer a ListObjectsV2 page or an error can legitimately be: 1,000 keys
    /// of at most 1,024 bytes each, escaped, with their fields.
    package static let listLimit = 8 << 20
    /// The largest whole object ``get(_:range:limit:)`` fetches unless told otherwise.
    package static let objectLimit = 1 << 30

    /// - Parameters:
    ///   - endpoint: the store, `http(s)://host[:port]`, without the bucket.
    ///   - bucket: the bucket every call addresses.
    ///   - signer: the credentials and region requests are signed with.
    ///   - addressing: path style (the default) or virtual-host style.
    ///   - maxAttempts: attempts per call, the first included.
    ///   - backoff: the wait before the first retry.
    ///   - attemptTimeout: how long one attempt may take; 10 minutes moves a 16 MiB pack at
    ///     28 kB/s.
    ///   - caCertificate: a PEM file to trust besides the system's roots (a self-signed store).
    ///   - connectAddress: an address to connect to instead of the host name, which still
    ///     goes in `Host` and the signature: for virtual-host style where DNS does not
    ///     know the bucket's name (tests); plain HTTP only, TLS would check the address.
    /// - Throws: `CABackupError.invalidArgument` for an endpoint that is not `http(s)://host[:port]`.
    package init(
        endpoint: String, bucket: String, signer: SigV4Signer, addressing: Addressing = .path, maxAttempts: Int = 6,
        backoff: Duration = .milliseconds(200), attemptTimeout: Duration = .seconds(600),
        caCertificate: String? = nil, connectAddress: String? = nil
    ) throws {
        guard let url = URL(string: endpoint), let scheme = url.scheme?.lowercased(),
            ["http", "https"].contains(scheme),
            let host = url.host, !host.isEmpty, url.path.isEmpty || url.path == "/", url.query == nil
        else {
            throw CABackupError.invalidArgument("'\(endpoint)' is not an S3 endpoint: use http(s)://HOST[:PORT]")
        }
        self.scheme = scheme
        self.host = host.lowercased()
        self.port = url.port.flatMap { $0 == (scheme == "https" ? 443 : 80) ? nil : $0 }
        self.bucket = bucket
        self.addressing = addressing
        self.signer = signer
        self.maxAttempts = max(1, maxAttempts)
        self.backoff = backoff
        self.attemptTimeout = attemptTimeout
        self.connectAddress = connectAddress
        let ca = caCertificate ?? ""
        client = try SharedHTTPClient.client(caCertificate: ca, readTimeout: .seconds(120))
    }

    // MARK: Operations

    /// One page of ListObjectsV2: the objects under `prefix` after `continuationToken`,
    /// and the token of the next page (nil on the last).
    package func listPage(
        prefix: String, continuationToken: String? = nil, maxKeys: Int? = nil
    ) throws -> (objects: [S3Object], next: String?) {
        var query = [("list-type", "2"), ("prefix", prefix)]
        if let continuationToken { query.append(("continuation-token", continuationToken)) }
        if let maxKeys { query.append(("max-keys", String(maxKeys))) }
        let reply = try send("ListObjectsV2", .GET, key: nil, query: query, limit: Self.listLimit)
        guard let root = S3XMLElement.parse(reply.body), root.name == "ListBucketResult" else {
            throw S3Error.malformedAnswer(operation: "ListObjectsV2", reason: "not a ListBucketResult")
        }
        var objects: [S3Object] = []
        for c in root.children("Contents") {
            guard let key = c.text(of: "Key"), let size = c.text(of: "Size").flatMap({ Int($0) }), size >= 0 else {
                throw S3Error.malformedAnswer(operation: "ListObjectsV2", reason: "an entry without key or size")
            }
            objects.append(S3Object(key: key, size: size, etag: Self.unquote(c.text(of: "ETag") ?? "")))
        }
        let truncated = root.text(of: "IsTruncated") == "true"
        let next = root.text(of: "NextContinuationToken").flatMap { $0.isEmpty ? nil : $0 }
        if truncated && next == nil {
            throw S3Error.malformedAnswer(operation: "ListObjectsV2", reason: "truncated without a continuation token")
        }
        return (objects, truncated ? next : nil)
    }

    /// Every object under `prefix`, page after page.
    package func list(prefix: String, maxKeys: Int? = nil) throws -> [S3Object] {
        var all: [S3Object] = []
        var token: String?
        repeat {
            let page = try listPage(prefix: prefix, continuationToken: token, maxKeys: maxKeys)
            all += page.objects
            token = page.next
        } while token != nil
        return all
    }

    /// The object's size and entity tag, or nil when there is no such key.
    package func head(_ key: String) throws -> S3Object? {
        let reply = try send("HEAD", .HEAD, key: key, accept: [200, 404], limit: 0)
        guard reply.status == 200 else { return nil }
        guard let size = reply.headers.first(name: "Content-Length").flatMap({ Int($0) }), size >= 0 else {
            throw S3Error.malformedAnswer(operation: "HEAD", reason: "no valid Content-Length")
        }
        return S3Object(key: key, size: size, etag: Self.unquote(reply.headers.first(name: "ETag") ?? ""))
    }

    /// The object's bytes, or those in `range` (which must lie inside the object; S3
    /// answers `416 InvalidRange` for one that starts past its end).
    ///
    /// - Throws: ``S3Error`` with ``S3Error/isNotFound`` for a missing key.
    package func get(_ key: String, range: Range<Int>? = nil, limit: Int = objectLimit) throws -> [UInt8] {
        var headers: [(String, String)] = []
        if let range {
            precondition(range.lowerBound >= 0 && !range.isEmpty, "a range of at least one byte")
            headers.append(("Range", "bytes=\(range.lowerBound)-\(range.upperBound - 1)"))
        }
        let reply = try send(
            "GET", .GET, key: key, headers: headers, accept: range == nil ? [200] : [206],
            limit: min(range?.count ?? limit, limit))
        if let range, reply.body.count != range.count {
            throw S3Error.malformedAnswer(
                operation: "GET", reason: "\(reply.body.count) bytes for a range of \(range.count)")
        }
        return reply.body
    }

    /// Stores `bytes` as the object, signed with their SHA-256 (computed here unless given).
    package func put(_ key: String, bytes: [UInt8], sha256 hash: String? = nil) throws {
        _ = try send(
            "PUT", .PUT, key: key, body: .bytes(bytes), payloadHash: hash ?? sha256(bytes).hex, limit: Self.listLimit)
    }

    /// Stores the file at `path` as the object, streamed from disk, signed with `sha256`,
    /// the file's SHA-256 in hex as the caller knows it (for a pack, its name): the store
    /// refuses the body if it does not match.
    package func put(_ key: String, file path: String, sha256 hash: String) throws {
        let size: Int
        do {
            size = (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.intValue ?? -1
        } catch {
            throw CABackupError.io(operation: "stat", path: path, errno: ENOENT)
        }
        _ = try send("PUT", .PUT, key: key, body: .file(path, size: size), payloadHash: hash, limit: Self.listLimit)
    }

    /// Deletes the object; deleting a missing key succeeds (S3 answers 204 either way).
    package func delete(_ key: String) throws {
        _ = try send("DELETE", .DELETE, key: key, accept: [200, 204], limit: Self.listLimit)
    }

    /// Creates the bucket; one that exists and is ours already is not an error.
    package func createBucket() throws {
        do {
            _ = try send("CreateBucket", .PUT, key: nil, limit: Self.listLimit)
        } catch let e as S3Error where e.code == "BucketAlreadyOwnedByYou" {
            return
        }
    }

    // MARK: Requests

    /// What a call sends as its body.
    enum Body {
        case none
        case bytes([UInt8])
        /// A file streamed from disk in 1 MiB pieces, of the size it had when the call began.
        case file(String, size: Int)
    }

    struct Reply {
        var status: Int
        var headers: HTTPHeaders
        var body: [UInt8]
    }

    /// The `Host` header: the bucket in front for virtual-host style, the port when not
    /// the scheme's default.
    var hostHeader: String {
        let name = addressing == .virtualHost ? "\(bucket).\(host)" : host
        return port.map { "\(name):\($0)" } ?? name
    }

    /// The decoded path of `key` (nil: the bucket itself).
    func path(_ key: String?) -> String {
        switch addressing {
        case .path: return "/" + bucket + (key.map { "/" + $0 } ?? "")
        case .virtualHost: return "/" + (key ?? "")
        }
    }

    /// Sends one call, retrying as the type describes; statuses in `accept` are returned,
    /// every other one becomes an ``S3Error``.
    func send(
        _ operation: String, _ method: HTTPMethod, key: String?, query: [(String, String)] = [],
        headers extra: [(String, String)] = [], body: Body = .none, payloadHash: String = SigV4Signer.emptyPayloadHash,
        accept: Set<Int> = [200], limit: Int
    ) throws -> Reply {
        let target = self.path(key)
        let canonicalQuery = SigV4Signer.canonicalQuery(query)
        let authority = connectAddress.map { a in port.map { "\(a):\($0)" } ?? a } ?? hostHeader
        let url =
            "\(scheme)://\(authority)\(SigV4Signer.encodePath(target))\(canonicalQuery.isEmpty ? "" : "?" + canonicalQuery)"
        var attempt = 1
        while true {
            var headers = HTTPHeaders()
            headers.add(name: "Host", value: hostHeader)
            for (k, v) in extra { headers.add(name: k, value: v) }
            for (k, v) in signer.sign(
                method: method.rawValue, host: hostHeader, path: target, query: query, headers: extra,
                payloadHash: payloadHash, date: Date())
            {
                headers.add(name: k, value: v)
            }
            let retryable: S3Error
            do {
                let reply = try execute(url: url, method: method, headers: headers, body: body, limit: limit)
                lastAnswer.record()
                if accept.contains(reply.status) { return reply }
                let error = Self.error(operation: operation, status: reply.status, body: reply.body)
                guard reply.status >= 500 || error.code == "RequestTimeout" else { throw error }
                retryable = error
            } catch let e as S3Error {
                guard case .transport(_, let reason) = e else { throw e }
                retryable = e
                // Once the store has answered, a transport failure is an outage: keep
                // trying for the retry window (see RetryPolicy).
                if lastAnswer.answered {
                    NetworkWaits.report(
                        "waiting for the network: \(scheme)://\(hostHeader) does not answer (\(reason)); retrying")
                }
                if attempt >= maxAttempts, lastAnswer.answered,
                    RetryPolicy.retriesTransport(attempt: attempt, lastAnswer: lastAnswer)
                {
                    Thread.sleep(forTimeInterval: RetryPolicy.backoff(attempt: attempt))
                    attempt += 1
                    continue
                }
            }
            guard attempt < maxAttempts else { throw retryable }
            // Exponential back-off with jitter, so many clients do not retry in step.
            let wait = min(backoff * (1 << min(attempt - 1, 10)), .seconds(8))
            let jittered = wait * Double.random(in: 0.5...1.0)
            Thread.sleep(
                forTimeInterval: Double(jittered.components.seconds) + Double(jittered.components.attoseconds) * 1e-18)
            attempt += 1
        }
    }

    /// One HTTP exchange: transport failures and oversized answers become ``S3Error``s.
    private func execute(
        url: String, method: HTTPMethod, headers: HTTPHeaders, body: Body, limit: Int
    ) throws
        -> Reply
    {
        let requestBody: HTTPClient.Body?
        switch body {
        case .none: requestBody = nil
        case .bytes(let b): requestBody = .bytes(b)
        case .file(let path, let size):
            requestBody = Self.stream(file: path, size: size, loop: client.eventLoopGroup.next())
        }
        let request: HTTPClient.Request
        do {
            request = try HTTPClient.Request(url: url, method: method, headers: headers, body: requestBody)
        } catch {
            throw CABackupError.invalidArgument("'\(url)' is not a usable URL: \(error)")
        }
        // An error document is small however large the object: room for one either way.
        let accumulator = ResponseAccumulator(request: request, maxBodySize: max(limit, 64 << 10))
        let response: HTTPClient.Response
        do {
            response = try client.execute(
                request: request, delegate: accumulator, deadline: .now() + TimeAmount(attemptTimeout)
            )
            .wait()
        } catch is ResponseAccumulator.ResponseTooBigError {
            throw S3Error.answerTooLarge(operation: "\(method.rawValue)", limit: limit)
        } catch let e as CABackupError {
            throw e
        } catch {
            throw S3Error.transport(operation: "\(method.rawValue) \(url)", reason: Self.describe(error))
        }
        let received = Array((response.body ?? ByteBuffer()).readableBytesView)
        if (200..<300).contains(Int(response.status.code)) && received.count > limit {
            throw S3Error.answerTooLarge(operation: "\(method.rawValue)", limit: limit)
        }
        return Reply(status: Int(response.status.code), headers: response.headers, body: received)
    }

    /// A body that reads the file on a thread of its own (never on the event loop), one
    /// piece at a time, each written before the next is read; opened anew on each attempt.
    private static func stream(file path: String, size: Int, loop: any EventLoop) -> HTTPClient.Body {
        .stream(contentLength: Int64(size)) { writer in
            let done = loop.makePromise(of: Void.self)
            Thread.detachNewThread {
                do {
                    guard let handle = FileHandle(forReadingAtPath: path) else {
                        throw CABackupError.io(operation: "open", path: path, errno: ENOENT)
                    }
                    defer { try? handle.close() }
                    var sent = 0
                    while sent < size {
                        let piece = try handle.read(upToCount: min(1 << 20, size - sent)) ?? Data()
                        guard !piece.isEmpty else {
                            throw CABackupError.io(operation: "read (the file shrank)", path: path, errno: EIO)
                        }
                        try writer.write(.byteBuffer(ByteBuffer(bytes: piece))).wait()
                        sent += piece.count
                    }
                    done.succeed()
                } catch {
                    done.fail(error)
                }
            }
            return done.futureResult
        }
    }

    /// The ``S3Error`` of an error answer: S3's code and message from its error document,
    /// or the status's name when it sent none.
    static func error(operation: String, status: Int, body: [UInt8]) -> S3Error {
        if let root = S3XMLElement.parse(body), root.name == "Error", let code = root.text(of: "Code") {
            return .service(
                operation: operation, status: status, code: code,
                message: String((root.text(of: "Message") ?? "").prefix(300)))
        }
        let code =
            switch status {
            case 403: "AccessDenied"
            case 404: "NotFound"
            case 503: "SlowDown"
            default: HTTPResponseStatus(statusCode: status).reasonPhrase.replacingOccurrences(of: " ", with: "")
            }
        return .service(operation: operation, status: status, code: code, message: "")
    }

    /// An entity tag without its quotes.
    static func unquote(_ etag: String) -> String {
        etag.count >= 2 && etag.hasPrefix("\"") && etag.hasSuffix("\"") ? String(etag.dropFirst().dropLast()) : etag
    }

    /// A transport error in a few words.
    private static func describe(_ error: any Error) -> String {
        if let io = error as? IOError { return errnoDescription(io.errnoCode) }
        if let e = error as? HTTPClientError {
            switch e {
            case .connectTimeout: return "connecting timed out"
            case .readTimeout: return "the store stopped answering"
            case .deadlineExceeded: return "the call took too long"
            case .remoteConnectionClosed: return "the store closed the connection"
            default: break
            }
        }
        let s = "\(error)"
        return s.count > 120 ? String(s.prefix(120)) + "…" : s
    }
}
