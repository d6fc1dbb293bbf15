import P2PKernel

/// Who may protect, write and remove what: TomP2P's protection model, with its defaults, and
/// without its quirks (data signatures are verified, a failed putMeta changes nothing, removing
/// an entry clears its protection). Every backend applies these same rules.
///
/// - Domain protection covers (location, domain): once a signed put with `.protectDomain` claims
///   it, only its owner writes or removes anything in it. A protected domain that becomes empty
///   becomes unprotected.
/// - Entry protection covers (location, domain, content), every version: a signed value with
///   `protectEntry` makes its signer the owner. Removing the entry (its last version) clears it.
/// - The master-key rule: the holder of the key whose id (SHA-1 of the public key) equals a
///   domain key or a content key may always claim that domain or entry.
/// - Ownership moves by a put the owner signs whose value is signed by a new key, by a putMeta
///   with a new key's signature, or by `transferDomain`.
public struct ProtectionPolicy: Sendable, Hashable {
    /// Who may protect an unprotected domain or entry.
    public enum Mode: Sendable, Hashable {
        /// Anyone (TomP2P's default).
        case all
        /// Only the holder of its master key.
        case none
    }
    public var domains: Mode = .all
    public var entries: Mode = .all
    /// Whether the master-key rule applies (TomP2P's MASTER_PUBLIC_KEY, its default).
    public var masterKeys = true
    /// Domains that can never be protected (TomP2P's removeDomainProtection): a put asking to
    /// protect one is stored unprotected.
    public var unprotectableDomains: Set<Number160> = []

    public init(domains: Mode = .all, entries: Mode = .all, masterKeys: Bool = true, unprotectableDomains: Set<Number160> = []) {
        self.domains = domains
        self.entries = entries
        self.masterKeys = masterKeys
        self.unprotectableDomains = unprotectableDomains
    }

    /// Whether `key` is the master key of `number` (a domain or a content key).
    public func isMaster(_ key: SignerKey?, of number: Number160) -> Bool {
        guard masterKeys, let key else { return false }
        return key.id == number
    }

    /// Nil when `writer` may write or remove in the domain of `key`; else the refusal naming its
    /// owner. A value the owner signed may be stored by anyone (the owner's data moving between
    /// replicas): which version a key keeps is decided by the signed stamps, so a replayed older
    /// one changes nothing.
    public func checkDomain(owner: SignerKey?, writer: SignerKey?, valueSigner: SignerKey? = nil, key: Number640) -> StorageError? {
        guard let owner, owner != writer, !isMaster(writer, of: key.domain) else { return nil }
        if let valueSigner, valueSigner == owner { return nil }
        return .protected(key: key, owner: owner, domain: true)
    }

    /// Nil when the entry of `key` may be written; else the refusal naming its owner. Besides its
    /// owner (and master key), anyone may store a value or a removal the owner signed: replication
    /// carries the owner's versions, and the stamp the owner signed decides whether one replaces
    /// what is held (an older one never does).
    public func checkEntry(owner: SignerKey?, writer: SignerKey?, valueSigner: SignerKey? = nil, key: Number640) -> StorageError? {
        guard let owner, owner != writer, !isMaster(writer, of: key.content) else { return nil }
        if let valueSigner, valueSigner == owner { return nil }
        return .protected(key: key, owner: owner, domain: false)
    }

    /// Whether `writer` may protect the unprotected domain of `key`.
    public func mayProtectDomain(writer: SignerKey?, key: Number640) -> Bool {
        guard writer != nil, !unprotectableDomains.contains(key.domain) else { return false }
        return domains == .all || isMaster(writer, of: key.domain)
    }

    /// Whether `signer` may protect the unprotected entry of `key`.
    public func mayProtectEntry(signer: SignerKey?, key: Number640) -> Bool {
        guard signer != nil else { return false }
        return entries == .all || isMaster(signer, of: key.content)
    }

    /// The domain's owner after a permitted put by `writer` that asks to protect it.
    public func domainOwner(after current: SignerKey?, writer: SignerKey?, key: Number640) -> SignerKey? {
        guard let writer else { return current }
        if current == nil { return mayProtectDomain(writer: writer, key: key) ? writer : nil }
        if current == writer || isMaster(writer, of: key.domain) { return unprotectableDomains.contains(key.domain) ? nil : writer }
        return current
    }

    /// The entry's owner after a permitted put of `value`.
    public func entryOwner(after current: SignerKey?, value: StoredValue, key: Number640) -> SignerKey? {
        guard value.protectEntry, let signer = value.signature?.signer else { return current }
        if current == nil { return mayProtectEntry(signer: signer, key: key) ? signer : nil }
        return signer
    }
}
