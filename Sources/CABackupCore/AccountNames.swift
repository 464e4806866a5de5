/// Account names: 1-64 characters of `a-z 0-9 . _ -`, and not `.` or `..` (a name becomes
/// a directory on the server, so it is checked on both sides).
public func isValidUserName(_ s: String) -> Bool {
    let ok = s.utf8.allSatisfy { c in
        (c >= 0x61 && c <= 0x7A) || (c >= 0x30 && c <= 0x39) || c == 0x2E || c == 0x5F || c == 0x2D
    }
    return ok && !s.isEmpty && s.utf8.count <= 64 && s != "." && s != ".."
}
