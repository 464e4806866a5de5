import ArgumentParser
import CABackup
import CABackupUI
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

struct UICommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ui",
        abstract: "Serve this device's backups as a local web app.",
        discussion: discussion(
            "Listens on a loopback address only. At each start it makes a random access token and writes it into a file only you can read (cabackup-ui-PORT.html in $XDG_RUNTIME_DIR, else the config directory), which it opens in the browser unless --no-open; open that file again to reach the page from another browser. Repository passwords are entered in the page and kept in memory only. The repositories, paths and schedules are kept in the device configuration file (--config). Runs until interrupted. The page and its JSON API: docs/ui.md."
        ))

    @Option(
        name: .long,
        help: "Loopback address and port to listen on: 127.0.0.1, localhost or [::1] (port 0: any free port).")
    var listen = "127.0.0.1:0"

    @Flag(name: .long, help: "Do not open the page in a browser.")
    var noOpen = false

    @Option(name: .long, help: "The device configuration file (default: $XDG_CONFIG_HOME/cabackup/device.json).")
    var config: String?

    func run() async throws {
        guard let colon = listen.lastIndex(of: ":"), let port = Int(listen[listen.index(after: colon)...]),
            (0...65535).contains(port), UIOptions.isLoopback(String(listen[..<colon]))
        else {
            printError(
                "cabackup ui: --listen \(listen) is not a loopback address and port: give 127.0.0.1:PORT, localhost:PORT or [::1]:PORT"
            )
            throw ExitCode(64)
        }
        var options = UIOptions(
            host: String(listen[..<colon]), port: port,
            configPath: config.map(absolutePath) ?? DeviceConfiguration.defaultPath,
            accessDirectory: UIOptions.defaultAccessDirectory)
        options.kdf = kdfForNewKeys
        let server = try UIServer(options)
        Interrupt.firstSignal.withLock { $0 = { server.stop() } }
        let open = !noOpen
        try await server.run { url, accessFile in
            // Written with write(2), unbuffered: a script waiting for these lines sees them at once.
            let text = "cabackup ui: listening on \(url)\ncabackup ui: open \(accessFile) in a browser to log in\n"
            _ = text.withCString { Glibc.write(1, $0, strlen($0)) }
            if open { openInBrowser(accessFile) }
        }
        Interrupt.firstSignal.withLock { $0 = nil }
    }

    /// Opens `file` with xdg-open when there is one; a failure only means the user opens it.
    func openInBrowser(_ file: String) {
        let paths = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map(
            String.init)
        guard let opener = paths.map({ $0 + "/xdg-open" }).first(where: { Glibc.access($0, X_OK) == 0 }) else { return }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: opener)
        process.arguments = [file]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try? process.run()
    }
}
