import P2PKernel

/// The status page: one HTML document rendered here, whose body a small script fetches again
/// every few seconds (`/status.part`), so the page and its refresh share one renderer and the
/// page reads without script too.
enum StatusPage {
    static func page(_ s: NodeStatus, bucketSize: Int, refreshSeconds: Int) -> String {
        """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>SwiftP2P node \(esc(String(s.id.prefix(12))))</title>
        <style>\(css)</style></head>
        <body><main id="main">\(body(s, bucketSize: bucketSize))</main>
        <script>
        setInterval(async () => {
          try {
            const r = await fetch('/status.part', {cache: 'no-store'});
            if (r.ok) document.getElementById('main').innerHTML = await r.text();
          } catch (e) {}
        }, \(max(1, refreshSeconds) * 1000));
        </script></body></html>
        """
    }

    static func body(_ s: NodeStatus, bucketSize: Int) -> String {
        var h = ""
        h += "<header><h1>SwiftP2P node</h1><code id=\"node-id\">\(esc(s.id))</code>"
        h += "<p>announced <b>\(esc(s.announced))</b> · bound \(esc(s.bound)) · \(esc(s.security)) · up \(duration(s.uptimeSeconds))</p></header>"

        let r = s.reachability
        h += "<section id=\"reachability\"><h2>Reachability</h2><table>"
        h += row("reachable", r.reachable ? "<span class=\"ok\">yes</span>" : "<span class=\"bad\">no</span>", raw: true)
        h += row("how", r.method)
        if let t = r.natType { h += row("NAT", t) }
        if let e = r.external { h += row("external address", e) }
        h += row("port mappings", r.mappings.isEmpty ? "none" : r.mappings.joined(separator: ", "))
        h += row("relays", r.relays.isEmpty ? "none" : r.relays.joined(separator: ", "))
        h += "</table></section>"

        h += "<section id=\"peers\"><h2>Peer map</h2>"
        h += "<p><b id=\"verified-count\">\(s.verifiedPeers)</b> verified peers in \(s.buckets.count) buckets · \(s.overflowPeers) overflow · "
        h += "<b id=\"session-count\">\(s.sessions)</b> sessions · \(s.requestsInFlight) requests in flight · \(s.handshakes) handshakes · \(s.droppedMessages) packets dropped</p>"
        if s.buckets.isEmpty { h += "<p class=\"dim\">no peers yet</p>" }
        h += "<div class=\"buckets\">"
        for b in s.buckets.reversed() {
            let pct = min(100, b.peers.count * 100 / max(1, bucketSize))
            h += "<details class=\"bucket\"><summary><span class=\"bi\">bucket \(b.index)</span>"
            h += "<span class=\"bar\"><span style=\"width:\(pct)%\"></span></span><span class=\"bn\">\(b.peers.count)/\(bucketSize)</span></summary><ul>"
            for p in b.peers {
                h += "<li class=\"peer\" data-id=\"\(esc(p.id))\"><code>\(esc(String(p.id.prefix(16))))…</code> \(esc(p.address))</li>"
            }
            h += "</ul></details>"
        }
        h += "</div></section>"

        for section in s.sections {
            let id = section.title.lowercased().filter { $0.isLetter || $0.isNumber || $0 == "-" }
            h += "<section id=\"section-\(esc(id))\"><h2>\(esc(section.title.capitalized))</h2><table>"
            for cells in section.rows where cells.count == 2 { h += row(cells[0], cells[1]) }
            h += "</table></section>"
        }

        h += "<section id=\"plugins\"><h2>Plugins</h2><table><tr><th>plugin</th><th>version</th><th>commands</th></tr>"
        for p in s.plugins {
            h += "<tr><td>\(esc(p.name))</td><td>\(esc(p.version))</td><td>\(p.commands.isEmpty ? "<span class=\"dim\">none</span>" : p.commands.map { "<code>\(esc($0))</code>" }.joined(separator: " "))</td></tr>"
        }
        h += "</table></section>"

        h += "<section id=\"events\"><h2>Recent events</h2><ol reversed>"
        for e in s.events.reversed() { h += "<li><span class=\"dim\">\(duration(e.at))</span> \(esc(e.text))</li>" }
        if s.events.isEmpty { h += "<li class=\"dim\">none yet</li>" }
        h += "</ol></section>"
        return h
    }

    private static func row(_ name: String, _ value: String, raw: Bool = false) -> String {
        "<tr><th>\(esc(name))</th><td>\(raw ? value : esc(value))</td></tr>"
    }

    private static func duration(_ seconds: Double) -> String {
        let s = Int(seconds)
        if s < 60 { return "\(s) s" }
        if s < 3600 { return "\(s / 60) min \(s % 60) s" }
        return "\(s / 3600) h \(s % 3600 / 60) min"
    }

    /// HTML-escapes text: everything a peer can influence passes through here.
    static func esc(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for c in text.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(c)
            }
        }
        return out
    }

    static let css = """
    body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}
    main{max-width:980px;margin:0 auto;padding:18px}
    header h1{font-size:20px;margin:0 0 4px}header code{font-size:13px;color:#3a4a6b}
    section{background:#fff;border:1px solid #dde2ea;border-radius:8px;padding:10px 14px;margin:12px 0}
    h2{font-size:15px;margin:2px 0 8px}table{border-collapse:collapse}th,td{text-align:left;padding:2px 14px 2px 0;vertical-align:top}
    th{font-weight:600;color:#4b5568}.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}.dim{color:#7a8394}
    .buckets{display:flex;flex-direction:column;gap:2px}.bucket summary{display:flex;align-items:center;gap:8px;cursor:pointer;list-style:none}
    .bi{width:80px;color:#4b5568}.bn{width:52px;font-variant-numeric:tabular-nums}
    .bar{flex:1;height:12px;background:#edf0f5;border-radius:3px;overflow:hidden}.bar span{display:block;height:100%;background:#3f6fd8}
    .bucket ul{margin:4px 0 6px 88px;padding:0;list-style:none;font-size:12px}
    ol{margin:0;padding-left:20px;max-height:260px;overflow:auto;font-size:13px}code{font-family:ui-monospace,monospace}
    """
}
