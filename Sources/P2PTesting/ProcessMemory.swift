#if canImport(Glibc)
import Glibc
#endif

/// The resident set size of this process, read from /proc/self/statm (Linux); nil elsewhere.
public func residentMemoryBytes() -> Int? {
    #if os(Linux)
    guard let f = fopen("/proc/self/statm", "r") else { return nil }
    defer { fclose(f) }
    var size = 0, resident = 0
    guard fscanf_statm(f, &size, &resident) else { return nil }
    return resident * Int(sysconf(Int32(_SC_PAGESIZE)))
    #else
    return nil
    #endif
}

#if os(Linux)
private func fscanf_statm(_ f: UnsafeMutablePointer<FILE>, _ size: inout Int, _ resident: inout Int) -> Bool {
    var buffer = [CChar](repeating: 0, count: 128)
    guard fgets(&buffer, Int32(buffer.count), f) != nil else { return false }
    let text = String(cString: buffer)
    let parts = text.split(separator: " ")
    guard parts.count >= 2, let s = Int(parts[0]), let r = Int(parts[1]) else { return false }
    size = s
    resident = r
    return true
}
#endif

/// Raises the soft open-file limit to the hard limit: a testnet of N peers holds 2N sockets.
public func raiseOpenFileLimit() {
    _ = raiseOpenFileLimit(toAtLeast: 0)
}

/// Raises the open-file limit towards `needed`: the soft limit to the hard one, and the hard one
/// too where the process may (as root, up to the kernel's `fs.nr_open`). Returns the soft limit
/// and the hard limit in force afterwards.
@discardableResult
public func raiseOpenFileLimit(toAtLeast needed: Int) -> (soft: Int, hard: Int) {
    #if os(Linux)
    var limit = rlimit()
    guard getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0 else { return (0, 0) }
    if needed > 0, limit.rlim_max != rlim_t.max, limit.rlim_max < rlim_t(needed) {
        var wider = limit
        wider.rlim_max = rlim_t(min(needed, kernelOpenFileCeiling()))
        wider.rlim_cur = wider.rlim_max
        if wider.rlim_max > limit.rlim_max, setrlimit(RLIMIT_NOFILE_VALUE, &wider) == 0 { limit = wider }
    }
    if limit.rlim_cur < limit.rlim_max {
        var raised = limit
        raised.rlim_cur = limit.rlim_max
        if setrlimit(RLIMIT_NOFILE_VALUE, &raised) == 0 { limit = raised }
    }
    let cap = { (v: rlim_t) -> Int in v == rlim_t.max || v > rlim_t(Int.max) ? Int.max : Int(v) }
    return (cap(limit.rlim_cur), cap(limit.rlim_max))
    #else
    return (Int.max, Int.max)
    #endif
}

#if os(Linux)
/// The most open files a process may be allowed (`/proc/sys/fs/nr_open`; 1,048,576 when
/// unreadable, the kernel's default).
private func kernelOpenFileCeiling() -> Int {
    guard let f = fopen("/proc/sys/fs/nr_open", "r") else { return 1 << 20 }
    defer { fclose(f) }
    var buffer = [CChar](repeating: 0, count: 32)
    guard fgets(&buffer, Int32(buffer.count), f) != nil else { return 1 << 20 }
    return Int(String(cString: buffer).filter(\.isNumber)) ?? (1 << 20)
}
#endif

#if os(Linux)
private let RLIMIT_NOFILE_VALUE = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
#endif

/// CPU time this process has used so far (user plus system), in seconds.
public func processCPUSeconds() -> Double {
    #if canImport(Glibc)
    var usage = rusage()
    guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return 0 }
    func seconds(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
    return seconds(usage.ru_utime) + seconds(usage.ru_stime)
    #else
    return 0
    #endif
}
