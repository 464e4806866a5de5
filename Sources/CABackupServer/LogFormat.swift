import Foundation
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// How the server's log lines on stderr look (`--log-format`).
public enum ServerLogFormat: String, Sendable, CaseIterable {
    /// swift-log's own lines:
    /// `2026-12-05T11:56:19+0000 info cabackup.server: method=PUT ms=182 … status=201 [CABackupServer] PUT …`.
    case text
    /// One JSON object per line (``JSONLogHandler``), for a log collector.
    case json

    /// A logger writing in this format to stderr.
    func logger(label: String) -> Logger {
        switch self {
        case .text: Logger(label: label)
        case .json: Logger(label: label) { JSONLogHandler(label: $0) }
        }
    }
}

/// Writes each entry as one line of JSON to stderr:
/// `{"time":"2026-12-05T11:56:19.042Z","level":"info","label":"cabackup.server","message":"…",…}`
/// with the metadata's keys alongside (a key that would replace one of the four is
/// written as `meta_KEY`). Each line goes out in one `write(2)`, so lines from several
/// threads never interleave.
public struct JSONLogHandler: LogHandler {
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let label: String
    /// Where lines go: stderr unless a test says otherwise.
    let descriptor: Int32

    public init(label: String, descriptor: Int32 = 2) {
        self.label = label
        self.descriptor = descriptor
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { $1 } }
        if let own = event.metadata { all.merge(own) { $1 } }
        var line = "{\"time\":"
        Self.appendString(Self.timestamp(), to: &line)
        line += ",\"level\":"
        Self.appendString(event.level.rawValue, to: &line)
        line += ",\"label\":"
        Self.appendString(label, to: &line)
        line += ",\"message\":"
        Self.appendString(event.message.description, to: &line)
        for key in all.keys.sorted() {
            line += ","
            Self.appendString(["time", "level", "label", "message"].contains(key) ? "meta_" + key : key, to: &line)
            line += ":"
            Self.append(all[key]!, to: &line)
        }
        line += "}\n"
        var bytes = Array(line.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(descriptor, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }  // nowhere to log to: drop the line rather than fail a request
            done += n
        }
        bytes.removeAll()
    }

    /// Now in UTC, ISO 8601 with milliseconds: `2026-12-05T11:56:19.042Z`.
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var t = tm()
        var seconds = now.tv_sec
        gmtime_r(&seconds, &t)
        func pad(_ v: Int32, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(t.tm_year + 1900, 4))-\(pad(t.tm_mon + 1, 2))-\(pad(t.tm_mday, 2))T"
            + "\(pad(t.tm_hour, 2)):\(pad(t.tm_min, 2)):\(pad(t.tm_sec, 2)).\(pad(Int32(now.tv_nsec / 1_000_000), 3))Z"
    }

    /// A metadata value: integers, finite numbers and booleans as themselves, other
    /// values as JSON strings, lists as arrays, dictionaries as objects.
    static func append(_ value: Logger.Metadata.Value, to line: inout String) {
        switch value {
        case .string(let s): appendString(s, to: &line)
        case .stringConvertible(let c as any BinaryInteger): line += c.description
        case .stringConvertible(let c as Double) where c.isFinite: line += c.description
        case .stringConvertible(let c as Bool): line += c.description
        case .stringConvertible(let c): appendString(c.description, to: &line)
        case .array(let values):
            line += "["
            for (i, v) in values.enumerated() {
                if i > 0 { line += "," }
                append(v, to: &line)
            }
            line += "]"
        case .dictionary(let d):
            line += "{"
            for (i, key) in d.keys.sorted().enumerated() {
                if i > 0 { line += "," }
                appendString(key, to: &line)
                line += ":"
                append(d[key]!, to: &line)
            }
            line += "}"
        }
    }

    /// `s` as a JSON string: quotes, backslashes and control characters escaped.
    static func appendString(_ s: String, to line: inout String) {
        line += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": line += "\\\""
            case "\\": line += "\\\\"
            case "\n": line += "\\n"
            case "\r": line += "\\r"
            case "\t": line += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7F:
                let hex = String(scalar.value, radix: 16)
                line += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: line.unicodeScalars.append(scalar)
            }
        }
        line += "\""
    }
}
