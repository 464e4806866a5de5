import ArgumentParser
import CABackup

#if canImport(Glibc)
    import Glibc
#endif

struct KeyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "key", abstract: "Manage the passwords (key slots) of an encrypted repository.",
        subcommands: [KeyListCommand.self, KeyAddCommand.self, KeyRemoveCommand.self, KeyPasswdCommand.self])
}

/// The new password of `key add` and `key passwd`.
struct NewPasswordOptions: ParsableArguments {
    @Option(
        name: .long,
        help: "Read the new password from the first line of this file (default: $CABACKUP_NEW_PASSWORD, else a prompt)."
    )
    var newPasswordFile: String?

    func read(for location: String) throws -> String {
        try PasswordSource(file: newPasswordFile, environmentVariable: "CABACKUP_NEW_PASSWORD").readNew(for: location)
    }
}

struct KeyListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "list", abstract: "List the key slots; * marks the one the password opened.",
        discussion: discussion(
            "--json prints one JSON array, restic's fields: current, id, userName, hostName, created."))

    @OptionGroup var repository: RepositoryOptions

    @Flag(name: .long, help: "Print one JSON array.")
    var json = false

    struct Item: Encodable {
        let current: Bool
        let id: String
        let userName: String
        let hostName: String
        let created: String
    }

    func run() throws {
        let repo = try repository.open()
        if json {
            print(
                jsonLine(
                    try repo.keySlots().map {
                        Item(
                            current: $0.isCurrent, id: $0.id, userName: $0.username, hostName: $0.hostname,
                            created: $0.created)
                    }))
            return
        }
        print("   ID        CREATED                              HOST             USER")
        for k in try repo.keySlots() {
            let mark = k.isCurrent ? "*" : " "
            print("\(mark)  \(k.id.prefix(8))  \(pad(k.created, 35))  \(pad(k.hostname, 15))  \(k.username)")
        }
    }

    private func pad(_ s: String, _ n: Int) -> String {
        s.count >= n ? s : s + String(repeating: " ", count: n - s.count)
    }
}

struct KeyAddCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "add", abstract: "Add a key slot with a new password.", discussion: discussion())

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var newPassword: NewPasswordOptions

    func run() throws {
        let repo = try repository.open()
        let id = try repo.addKey(password: try newPassword.read(for: repo.storage.location), kdf: kdfForNewKeys)
        print("added key \(id.prefix(8))")
    }
}

struct KeyRemoveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remove", abstract: "Remove a key slot (not the one the password opened).",
        discussion: discussion())

    @OptionGroup var repository: RepositoryOptions
    @Argument(help: "The key slot's id (8 or more hex digits, see 'key list').")
    var id: String

    func run() throws {
        let repo = try repository.open()
        try repo.removeKey(id)
        print("removed key \(id)")
    }
}

struct KeyPasswdCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "passwd", abstract: "Change the password: replace the key slot the password opened.",
        discussion: discussion())

    @OptionGroup var repository: RepositoryOptions
    @OptionGroup var newPassword: NewPasswordOptions

    func run() throws {
        let repo = try repository.open()
        let id = try repo.changePassword(
            to: try newPassword.read(for: repo.storage.location), kdf: kdfForNewKeys)
        print("password changed: new key \(id.prefix(8)) replaces the old one")
    }
}
