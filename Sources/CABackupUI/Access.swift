import CABackup
import Foundation
import HTTPTypes
import Hummingbird
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Who may use the page: whoever can read the access file.
///
/// A random token is made at each start and written only into a 0600 file (never printed,
/// never on a command line, as Jupyter does). `GET /login?token=…` exchanges it for a session
/// cookie (HttpOnly, SameSite=Strict); every other route needs that cookie.
final class Access: Sendable {
    static let cookieName = "cabackup_ui"
    /// Sessions kept: a new login beyond them ends the oldest.
    static let maxSessions = 64

    /// 32 random bytes, hex.
    private let token: [UInt8] = Array(hexString(secureRandomBytes(32)).utf8)
    private let sessions = Mutex<[String]>([])
    /// The port the server listens on, once it does (the Host and Origin checks need it).
    let port = Atomic(0)
    /// Where the access file is written: `$XDG_RUNTIME_DIR`, else the config directory.
    let directory: String

    init(directory: String) {
        self.directory = directory
    }

    /// `DIR/cabackup-ui-PORT.html`.
    var file: String { directory + "/cabackup-ui-\(port.load(ordering: .relaxed)).html" }

    /// Writes the access file (mode 0600): a page that sends the browser to the login URL
    /// at `base` (`http://127.0.0.1:PORT`).
    func writeFile(base: String) throws {
        let url = base + "/login?token=" + String(decoding: token, as: UTF8.self)
        let page = """
            <!DOCTYPE html>
            <html><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url=\(url)">
            <title>cabackup</title></head>
            <body><p>Opening cabackup… If nothing happens, <a href="\(url)">follow this link</a>.</p></body></html>

            """
        try makeDirectories(directory)
        try writeFileAtomically(file, Array(page.utf8), mode: 0o600)
    }

    /// Removes the access file (at a clean stop).
    func removeFile() { unlink(file) }

    /// Whether `candidate` is this process's token (compared in constant time).
    func isToken(_ candidate: String) -> Bool {
        constantTimeEqual(Array(candidate.utf8), token)
    }

    /// A new session, remembered; its id goes into the cookie.
    func newSession() -> String {
        let id = hexString(secureRandomBytes(32))
        sessions.withLock {
            $0.append(id)
            if $0.count > Self.maxSessions { $0.removeFirst() }
        }
        return id
    }

    /// Whether the request carries the cookie of a live session.
    func hasSession(_ request: Request) -> Bool {
        let cookies = request.headers[values: .cookie].flatMap { $0.split(separator: ";") }
        let prefix = Self.cookieName + "="
        guard
            let value = cookies.map({ $0.trimmingCharacters(in: .whitespaces) }).first(where: { $0.hasPrefix(prefix) })
        else { return false }
        let id = Array(value.dropFirst(prefix.count).utf8)
        return sessions.withLock { all in
            // Every live session is compared, in constant time each.
            all.reduce(false) { $0 || constantTimeEqual(Array($1.utf8), id) }
        }
    }

    /// The `Host` values a browser sends for this server: anything else is a name some
    /// other site resolved to 127.0.0.1 (DNS rebinding).
    func isOwnHost(_ host: String?) -> Bool {
        let port = port.load(ordering: .relaxed)
        return ["127.0.0.1:\(port)", "localhost:\(port)", "[::1]:\(port)"].contains(host ?? "")
    }

    /// The origins this page is served from.
    func isOwnOrigin(_ origin: String) -> Bool {
        let port = port.load(ordering: .relaxed)
        return ["http://127.0.0.1:\(port)", "http://localhost:\(port)", "http://[::1]:\(port)"].contains(origin)
    }
}

/// The checks every request passes before its route (see ``Access``), and the headers
/// every response gets.
struct AccessMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let access: Access
    static let uiHeader = HTTPField.Name("X-CABackup-UI")!
    static let frameOptions = HTTPField.Name("X-Frame-Options")!
    static let referrerPolicy = HTTPField.Name("Referrer-Policy")!
    /// Routes reachable without a session.
    static let open: Set<String> = ["/login", "/locked"]

    func handle(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        var response = try await check(request, context: context, next: next)
        response.headers[.cacheControl] = "no-store"
        response.headers[.xContentTypeOptions] = "nosniff"
        response.headers[Self.frameOptions] = "DENY"
        response.headers[.contentSecurityPolicy] =
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
        response.headers[Self.referrerPolicy] = "no-referrer"
        return response
    }

    private func check(
        _ request: Request, context: Context, next: (Request, Context) async throws -> Response
    ) async throws -> Response {
        let host = request.head.authority
        guard access.isOwnHost(host) else {
            return errorResponse(403, "this server answers only to 127.0.0.1, localhost or [::1] with its port")
        }
        if ![.get, .head].contains(request.method) {
            guard request.headers[Self.uiHeader] == "1" else {
                return errorResponse(403, "a request that changes something needs the header X-CABackup-UI: 1")
            }
            if let origin = request.headers[.origin], !access.isOwnOrigin(origin) {
                return errorResponse(403, "requests from another site are refused")
            }
        }
        let path = request.uri.path
        guard Self.open.contains(path) || access.hasSession(request) else {
            if path.hasPrefix("/api/") {
                return errorResponse(401, "not logged in: open the link in \(access.file)")
            }
            return Response(status: .seeOther, headers: [.location: "/locked"])
        }
        do {
            return try await next(request, context)
        } catch let error as HTTPError {
            // No route (404), no such method (405): JSON, with the headers.
            return errorResponse(
                Int(error.status.code), "no such page or API endpoint: the API is described in docs/ui.md")
        }
    }
}
