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
    #if os(Linux)
    var limit = rlimit()
    if getrlimit(RLIMIT_NOFILE_VALUE, &limit) == 0, limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max
        _ = setrlimit(RLIMIT_NOFILE_VALUE, &limit)
    }
    #endif
}

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
