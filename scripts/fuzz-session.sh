#!/usr/bin/env bash
# Builds the libFuzzer target for the session layer's decoders and replay window, and runs it.
#   scripts/fuzz-session.sh [RUNS] [extra libFuzzer flags…]     (RUNS defaults to 10,000,000)
# Like scripts/fuzz-wire.sh, it compiles the sources directly: the packet codec needs nothing
# but the standard library.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10000000}"; shift || true
out=Fuzz/.out; mkdir -p "$out" Fuzz/session-corpus
swiftc -O -sanitize=fuzzer,address -parse-as-library -module-name SessionFuzz \
  Sources/P2PKernel/Identity/Number160.swift Sources/P2PKernel/Identity/Number640.swift \
  Sources/P2PKernel/Identity/PeerAddress.swift Sources/P2PKernel/Wire/*.swift \
  Sources/P2PKernel/Session/SessionPackets.swift Sources/P2PKernel/Session/ReplayWindow.swift \
  Fuzz/SessionFuzz/main.swift -o "$out/session-fuzz"
[ -n "$(ls -A Fuzz/session-corpus 2>/dev/null)" ] || python3 Fuzz/make_session_seeds.py Fuzz/session-corpus
SWIFT_BACKTRACE=enable=no exec "$out/session-fuzz" -runs="$runs" -max_len=2048 -print_final_stats=1 "$@" Fuzz/session-corpus
