import Foundation
import Testing

/// The consistency check (`p2p sim --check`) as a test: the real nodes, storage and replication
/// on the simulated network in virtual time, with a fixed seed — so the run, and its verdict,
/// repeat exactly on any machine, however busy.
@Suite("Consistency under faults")
struct ConsistencyCheckTests {
    @Test("100 peers, 700 operations from 16 clients while 3 waves of 30 % churn, a 30/70 partition of 20 s that heals and 2 % loss run: 0 acknowledged writes lost, 0 stale or removed values read once settled, and replication goes quiet")
    func checkUnderFaults() throws {
        let r = try P2PTool.run(["sim", "--network", "simulated", "--check", "--peers", "100", "--check-ops", "700", "--concurrency", "16",
                                 "--churn", "0.3", "--churn-waves", "3", "--loss", "0.02", "--partition-seconds", "20",
                                 "--seed", "7", "--json"], timeout: 900)
        #expect(r.code == 0, "\(r.err.suffix(2_000))")
        let object = try #require(try JSONSerialization.jsonObject(with: Data(r.out.utf8)) as? [String: Any], "\(r.out.suffix(500))")
        let check = try #require(object["check"] as? [String: Any])
        #expect(check["valid"] as? Bool == true)
        for finding in ["lost_writes", "stale_reads", "resurrected", "phantoms"] {
            #expect(check[finding] as? Int == 0, "\(finding): \(check[finding] ?? "missing")")
        }
        // Something was at stake: most writes were acknowledged, every key read after settling.
        let acknowledged = try #require(check["acknowledged_writes"] as? Int)
        #expect(acknowledged >= 300, "\(acknowledged) acknowledged writes")
        #expect(check["settled_reads"] as? Int == 70)
        // The faults happened: three waves of peers left and joined while the workload ran.
        #expect((check["left"] as? Int ?? 0) >= 80 && (check["joined"] as? Int ?? 0) >= 80, "\(check)")
        // Replication went quiet: for five intervals no value moved.
        #expect(check["settled"] as? Bool == true, "\(check)")
        print("consistency check: \(check)")
    }
}
