import AsyncHTTPClient
import CABackup
import NIOCore
import NIOSSL
import Synchronization

/// The AsyncHTTPClients of the process: one per trust configuration and read timeout,
/// shared by every server and S3 client, so connections are pooled and kept alive
/// across calls. TLS 1.2 at least; redirects are never followed.
enum SharedHTTPClient {
    private static let clients = Mutex<[String: HTTPClient]>([:])

    /// The client trusting the system's roots plus the PEM file `caCertificate` (`""`:
    /// none), which gives up on an answer after `readTimeout` of silence, and on a request
    /// body after 30 s without progress.
    /// - Throws: `CABackupError.invalidArgument` when the certificate cannot be read.
    static func client(caCertificate ca: String, readTimeout: TimeAmount) throws -> HTTPClient {
        try clients.withLock { (all) throws in
            let key = "\(readTimeout.nanoseconds) \(ca)"
            if let c = all[key] { return c }
            var tls = TLSConfiguration.makeClientConfiguration()
            tls.minimumTLSVersion = .tlsv12
            if !ca.isEmpty {
                do {
                    tls.additionalTrustRoots = [.certificates(try NIOSSLCertificate.fromPEMFile(ca))]
                } catch {
                    throw CABackupError.invalidArgument("cannot read CA certificate \(ca): \(error)")
                }
            }
            let c = HTTPClient(
                eventLoopGroupProvider: .singleton,
                configuration: HTTPClient.Configuration(
                    tlsConfiguration: tls, redirectConfiguration: .disallow,
                    // A stalled link fails a call (which is then retried) after this
                    // much silence either way, not after the call's deadline.
                    timeout: .init(connect: .seconds(10), read: readTimeout, write: .seconds(30))))
            all[key] = c
            return c
        }
    }
}
