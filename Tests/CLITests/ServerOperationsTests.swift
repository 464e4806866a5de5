import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// What an operator running the server behind a load balancer relies on: a health check
/// that says when an instance cannot serve, and a stop that loses nothing.
@Suite("server operations: health checks and graceful shutdown")
struct ServerOperationsTests {
    @Test("/healthz answers ok while the server can serve, and 503 when its storage is gone")
    func health() throws {
        let (s, server, _) = try aliceOnServer()
        let (ok, body) = try http("GET", server.url + "/healthz")
        #expect(ok == 200, "\(body)")
        #expect(body.contains(#""status":"ok""#), "\(body)")
        let spaces = server.data + "/spaces"
        try FileManager.default.moveItem(atPath: spaces, toPath: s.file("moved-away"))
        let (down, why) = try http("GET", server.url + "/healthz")
        #expect(down == 503, "\(why)")
        #expect(why.contains("unavailable"), "\(why)")
        try FileManager.default.moveItem(atPath: s.file("moved-away"), toPath: spaces)
        #expect(try http("GET", server.url + "/healthz").0 == 200)
    }

    @Test("SIGTERM during an upload: the upload is received and stored whole, then the server exits 0")
    func gracefulStop() throws {
        let (s, first, alice) = try aliceOnServer()
        var server = first
        try writeRandom(s.file("src/a.bin"), megabytes: 3)
        #expect(try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice).status == 0)
        let pack = try #require(try spacePacks(server.data, "alice").first)
        let name = (pack as NSString).lastPathComponent
        let copy = s.file("pack")
        try FileManager.default.copyItem(atPath: pack, toPath: copy)
        let token = try storedToken(alice)
        #expect(try http("DELETE", server.url + "/v1/space/packs/" + name, token: token).0 == 204)

        // The pack comes back slowly; the server is told to stop while it arrives.
        let tmp = server.data + "/spaces/alice/tmp"
        let (uploader, out) = try startAbuse(
            "slowput", server.host, server.portString, token, "/v1/space/packs/" + name, copy, "4")
        #expect(eventually(within: 10) { !((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? []).isEmpty })
        kill(server.process.processIdentifier, SIGTERM)
        uploader.waitUntilExit()
        let answer = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        #expect(answer.contains("201"), "\(answer)")
        #expect(eventually(within: 20) { !server.process.isRunning })
        #expect(server.process.terminationStatus == 0)
        #expect(FileManager.default.contentsEqual(atPath: pack, andPath: copy))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: tmp)) ?? [""]).isEmpty)

        // Started again, the space is whole.
        server = try TestServer(data: s.file("server"), port: server.port)
        let check = try cabackup("check", "--repo", server.repo("alice"), "--read-data", env: alice)
        #expect(check.status == 0, "\(check.stderr)")
    }
}
