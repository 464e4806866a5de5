import ArgumentParser
import Foundation

/// `-v`/`--verbose` (repeatable) and `-q`/`--quiet`, as restic has them: `-q` drops
/// progress and informational lines (results, warnings and errors stay); each `-v`
/// adds detail (`-v` names what is done per file, `-vv` also what is unchanged).
struct VerbosityOptions: ParsableArguments {
    @Flag(name: [.short, .long], help: "Print more: per-file lines (-v), also unchanged files (-vv).")
    var verbose: Int

    @Flag(name: [.short, .long], help: "Print no progress and no informational lines.")
    var quiet = false

    func validate() throws {
        if quiet && verbose > 0 { throw ValidationError("--quiet and --verbose cannot be used together") }
    }

    /// 0 with `--quiet`, 1 by default, 2 with `-v`, 3 with `-vv`.
    var level: Int { quiet ? 0 : 1 + verbose }
}

/// A stream of JSON status lines on stdout for GUIs and scripts, restic's model: one
/// object per line, each with a `message_type` (`status`, `verbose_status`, `error`,
/// `summary`, …). Lines are written whole with one `write(2)`, so lines from several
/// threads never interleave.
enum JSONMessages {
    /// Writes `value`, which must encode as a keyed object, as one line: its keys plus
    /// `message_type`, all sorted.
    static func emit(_ type: String, _ value: some Encodable) {
        let enc = JSONEncoder()
        enc.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        guard let data = try? enc.encode(Tagged(messageType: type, value: value)) else { return }
        var line = data
        line.append(0x0A)
        line.withUnsafeBytes { b in
            var off = 0
            while off < b.count {
                let n = write(1, b.baseAddress! + off, b.count - off)
                if n <= 0 {
                    if n < 0 && errno == EINTR { continue }
                    return
                }
                off += n
            }
        }
    }

    /// The value's own keys plus `message_type`.
    private struct Tagged<V: Encodable>: Encodable {
        let messageType: String
        let value: V

        private struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }

        func encode(to encoder: Encoder) throws {
            try value.encode(to: encoder)
            var c = encoder.container(keyedBy: Key.self)
            try c.encode(messageType, forKey: Key(stringValue: "message_type"))
        }
    }
}
