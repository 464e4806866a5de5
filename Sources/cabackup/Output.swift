import CABackup
import Foundation

/// `1.5 GiB`-style sizes.
func formatBytes(_ n: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n)
    var i = 0
    while v >= 1024 && i < units.count - 1 {
        v /= 1024
        i += 1
    }
    return i == 0 ? "\(n) B" : String(format: "%.2f %@", v, units[i])
}

func formatDuration(_ s: Double) -> String {
    let t = Int(s.rounded())
    return t >= 3600
        ? String(format: "%d:%02d:%02d", t / 3600, t / 60 % 60, t % 60) : String(format: "%d:%02d", t / 60, t % 60)
}

/// One JSON line with sorted keys.
func jsonLine(_ value: some Encodable) -> String {
    let enc = JSONEncoder()
    enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try! enc.encode(value), as: UTF8.self)
}

/// A path for JSON: `path` (invalid UTF-8 replaced by U+FFFD) and, only when that lost
/// information, `path_b64` with the exact bytes.
struct JSONPath {
    let path: String
    let pathB64: String?

    init(_ bytes: [UInt8]) {
        path = String(decoding: bytes, as: UTF8.self)
        pathB64 = Array(path.utf8) == bytes ? nil : Data(bytes).base64EncodedString()
    }
}

/// A one-line progress display on stderr, redrawn in place; silent when stderr is not
/// a terminal.
// Safe: `shown` is guarded by `lock`; restore calls `update` from its writer threads.
final class ProgressLine: @unchecked Sendable {
    private let lock = NSLock()
    private var shown = false

    func update(_ text: String) {
        guard stderrIsTerminal else { return }
        var cols = 80
        var ws = winsize()
        if ioctl(2, UInt(TIOCGWINSZ), &ws) == 0 && ws.ws_col > 0 { cols = Int(ws.ws_col) }
        let line = String(text.prefix(max(10, cols - 1)))
        lock.withLock {
            FileHandle.standardError.write(Data(("\r\u{1B}[2K" + line).utf8))
            shown = true
        }
    }

    func clear() {
        lock.withLock {
            guard shown else { return }
            FileHandle.standardError.write(Data("\r\u{1B}[2K".utf8))
            shown = false
        }
    }
}
