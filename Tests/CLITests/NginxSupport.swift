import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// nginx (Debian's, which `scripts/ensure-deps` installs) on a free port of 127.0.0.1 as
/// a round-robin load balancer in front of server instances, configured as
/// docs/operations.md tells an operator: uploads and downloads streamed, the client's
/// address in `X-Forwarded-For`. Stopped when dropped.
final class Nginx {
    let process = Process()
    let dir = Scratch()
    let port: Int
    var url: String { "http://127.0.0.1:\(port)" }

    /// Balances over `upstreams` (`127.0.0.1:PORT` each).
    init(upstreams: [String]) throws {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"].first { FileManager.default.isExecutableFile(atPath: $0) }
        guard let binary else {
            Issue.record("no nginx: install it with 'apt-get install nginx-light' (scripts/ensure-deps does)")
            throw CocoaError(.fileNoSuchFile)
        }
        port = try freePorts(1)[0]
        let d = dir.file("")
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            try FileManager.default.createDirectory(atPath: d + sub, withIntermediateDirectories: true)
        }
        let servers = upstreams.map { "        server \($0) max_fails=1 fail_timeout=2s;" }.joined(separator: "\n")
        let config = """
            worker_processes 1;
            \(getuid() == 0 ? "user root;" : "")
            error_log \(d)error.log;
            pid \(d)nginx.pid;
            events { worker_connections 512; }
            http {
                log_format upstream '$request_method $uri $status $upstream_addr';
                access_log \(d)access.log upstream;
                client_body_temp_path \(d)body;
                proxy_temp_path \(d)proxy;
                fastcgi_temp_path \(d)fastcgi;
                uwsgi_temp_path \(d)uwsgi;
                scgi_temp_path \(d)scgi;
                upstream cabackup {
            \(servers)
                }
                server {
                    listen 127.0.0.1:\(port);
                    client_max_body_size 130m;
                    proxy_request_buffering off;
                    proxy_buffering off;
                    proxy_read_timeout 300s;
                    location / {
                        proxy_pass http://cabackup;
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_set_header Host $http_host;
                        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
                    }
                }
            }
            """
        try Data(config.utf8).write(to: URL(fileURLWithPath: d + "nginx.conf"))
        process.executableURL = URL(fileURLWithPath: binary)
        process.arguments = ["-c", d + "nginx.conf", "-p", d, "-g", "daemon off;"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !canConnect(port) {
            guard process.isRunning, Date() < deadline else {
                let log = (try? String(contentsOfFile: d + "error.log", encoding: .utf8)) ?? ""
                Issue.record("nginx did not start: \(log.suffix(2000))")
                throw CocoaError(.fileReadUnknown)
            }
            usleep(50_000)
        }
    }

    /// The requests nginx passed on, one line each.
    var accessLog: [String] {
        ((try? String(contentsOfFile: dir.file("access.log"), encoding: .utf8)) ?? "").split(separator: "\n")
            .map(String.init)
    }

    /// Stops nginx (a no-op once stopped).
    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
        }
    }

    deinit { stop() }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
func canConnect(_ port: Int) -> Bool {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = in_port_t(UInt16(port).bigEndian)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &addr) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
        }
    } == 0
}
