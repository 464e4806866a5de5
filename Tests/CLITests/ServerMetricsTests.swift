import Foundation
import Testing

/// What an operator watches: Prometheus metrics on an address of their own, and log lines
/// a collector can parse that never hold a password or a token.
@Suite("server operations: metrics and JSON logs")
struct ServerMetricsTests {
    @Test("/metrics on its own port counts requests by route, bytes, uploads, leases, storage calls and quota refusals")
    func metrics() throws {
        let s = Scratch()
        let server = try TestServer(data: s.file("server"), metrics: true)
        let metricsURL = try #require(server.metricsURL)
        let alice = device(s, "alice", password: "alice password")
        try signUp(server, "alice", env: alice)
        try writeRandom(s.file("src/a.bin"), megabytes: 3)
        let first = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice)
        #expect(first.status == 0, "\(first.stderr)")

        let (status, text) = try http("GET", metricsURL)
        #expect(status == 200, "\(text)")
        let packs = "/v1/space/packs/{name}"
        #expect(sample(text, "cabackup_http_requests_total", ["route": packs, "method": "PUT", "status": "201"]) > 0)
        #expect(sample(text, "cabackup_http_requests_total", ["route": "/v1/register", "status": "201"]) == 1)
        // Routes are patterns: no pack name, no account name is a label value.
        #expect(!text.contains("alice"))
        #expect(!text.contains(try #require(spacePacks(server.data, "alice").first as NSString?).lastPathComponent))
        let packBytes = try spacePacks(server.data, "alice").reduce(0) {
            $0 + ((try FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0)
        }
        #expect(sample(text, "cabackup_http_received_bytes_total") >= Double(packBytes))
        #expect(sample(text, "cabackup_http_sent_bytes_total") > 0)
        #expect(sample(text, "cabackup_upload_duration_seconds_count", ["kind": "pack"]) > 0)
        #expect(sample(text, "cabackup_upload_duration_seconds_count", ["kind": "snapshot"]) == 1)
        #expect(sample(text, "cabackup_storage_calls_total", ["operation": "put"]) > 0)
        #expect(sample(text, "cabackup_storage_calls_total", ["operation": "head"]) > 0)
        #expect(sample(text, "cabackup_lock_leases_granted_total") >= 1)
        #expect(sample(text, "cabackup_lock_leases_released_total") >= 1)
        #expect(sample(text, "cabackup_quota_refusals_total") == 0)

        // Over her quota, her next pack is refused, and counted.
        let used = try spaceBytes(server.data + "/spaces/alice")
        let quota = try run(
            cabackupBinary, ["server", "admin", "quota", "alice", "\(used + 1000)", "--data", server.data])
        #expect(quota.status == 0, "\(quota.stderr)")
        try writeRandom(s.file("src/b.bin"), megabytes: 3)
        let refused = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice)
        #expect(refused.status != 0)
        let after = try http("GET", metricsURL).1
        #expect(sample(after, "cabackup_quota_refusals_total") >= 1)
        #expect(sample(after, "cabackup_http_requests_total", ["route": packs, "status": "413"]) >= 1)

        // Each port serves its own: no counters on the API's, no API on the metrics'.
        #expect(try http("GET", server.url + "/metrics").0 == 404)
        let base = String(metricsURL.dropLast("/metrics".count))
        #expect(try http("GET", base + "/healthz").0 == 404)
        #expect(try http("POST", base + "/v1/login", data: "{}").0 == 404)
        // The metrics listener stops with the server.
        #expect(server.stop() == 0)
        #expect(try http("GET", metricsURL).0 == -1)
    }

    @Test("with PostgreSQL and a bucket, /metrics counts database round trips and S3 calls")
    func sharedMetrics() async throws {
        let postgres = try await PostgresServer()
        let database = postgres.url
        try await offPool {
            let store = try SeaweedFS()
            try store.createBucket("spaces")
            let s = Scratch()
            let server = try TestServer(
                data: s.file("server"), ["--storage", "s3:\(store.endpoint)/spaces", "--database", database],
                env: store.environment.merging(["PGPASSWORD": PostgresServer.password]) { $1 }, metrics: true)
            let alice = device(s, "alice", password: "alice password")
            try signUp(server, "alice", env: alice)
            try writeRandom(s.file("src/a.bin"), megabytes: 2)
            let snapshot = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: alice)
            #expect(snapshot.status == 0, "\(snapshot.stderr)")
            let text = try http("GET", try #require(server.metricsURL)).1
            let transactions = sample(text, "cabackup_database_transactions_total", ["store": "postgresql"])
            #expect(transactions > 0)
            // Each transaction is BEGIN, a statement or more, COMMIT.
            #expect(sample(text, "cabackup_database_round_trips_total") >= 3 * transactions)
            #expect(sample(text, "cabackup_storage_calls_total", ["operation": "put"]) > 0)
            #expect(sample(text, "cabackup_storage_calls_total", ["operation": "list"]) > 0)
        }
        withExtendedLifetime(postgres) {}
    }

    @Test("--log-format json: every stderr line is a JSON object; no password or token is ever logged")
    func jsonLogs() throws {
        let s = Scratch()
        let log = s.file("server.log")
        let server = try TestServer(data: s.file("server"), ["--log-format", "json"], log: log)
        let laptop = device(s, "laptop", password: "alice password")
        try signUp(server, "alice", env: laptop)
        let phone = device(s, "phone", password: "alice password")
        let login = try cabackup("login", "--server", server.url, "--user", "alice", env: phone)
        #expect(login.status == 0, "\(login.stderr)")
        try writeRandom(s.file("src/a.bin"), megabytes: 1)
        let snapshot = try cabackup("snapshot", "--repo", server.repo("alice"), s.file("src"), env: laptop)
        #expect(snapshot.status == 0, "\(snapshot.stderr)")
        let forged = "forged-token-0123456789abcdef"
        #expect(try http("GET", server.url + "/v1/space/packs", token: forged).0 == 401)
        let bad = try http("POST", server.url + "/v1/login", data: #"{"user":"alice","secret":"wrong secret 42"}"#)
        #expect(bad.0 >= 400, "\(bad)")
        #expect(server.stop() == 0)

        let text = try String(contentsOfFile: log, encoding: .utf8)
        let lines = text.split(separator: "\n")
        #expect(lines.count > 10)
        for line in lines {
            let entry = jsonObject(String(line))
            #expect(entry?["level"] is String && entry?["message"] is String, "\(line)")
            #expect((entry?["time"] as? String)?.hasSuffix("Z") == true, "\(line)")
        }
        // The request lines carry their route and status as fields.
        #expect(
            lines.contains {
                let e = jsonObject(String($0))
                return e?["route"] as? String == "/v1/space/packs/{name}" && e?["status"] as? Int == 201
            })
        for secret in ["alice password", try storedToken(laptop), try storedToken(phone), forged, "wrong secret 42"] {
            #expect(!text.contains(secret), "the log holds '\(secret)'")
        }
        #expect(!text.lowercased().contains("bearer"))
    }
}

/// The sum of the samples of `name` whose labels include `labels`, in a Prometheus text
/// exposition.
func sample(_ text: String, _ name: String, _ labels: [String: String] = [:]) -> Double {
    var total = 0.0
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
            continue
        }
        let series = line[..<space]
        let metric = series.prefix { $0 != "{" }
        guard metric == name, labels.allSatisfy({ series.contains("\($0.key)=\"\($0.value)\"") }) else { continue }
        total += value
    }
    return total
}
