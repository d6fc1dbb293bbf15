#!/usr/bin/env bash
# Builds the libFuzzer target for the wire decoder and runs it.
#   scripts/fuzz-wire.sh [RUNS] [extra libFuzzer flags…]     (RUNS defaults to 10,000,000)
# The codec has no dependencies, so its sources are compiled directly with the sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10000000}"; shift || true
out=Fuzz/.out; mkdir -p "$out" Fuzz/corpus
swiftc -O -sanitize=fuzzer,address -parse-as-library -module-name WireFuzz \
  Sources/P2PKernel/Identity/Number160.swift Sources/P2PKernel/Identity/Number640.swift \
  Sources/P2PKernel/Identity/PeerAddress.swift Sources/P2PKernel/Wire/*.swift \
  Fuzz/WireFuzz/main.swift -o "$out/wire-fuzz"
# Seed the corpus with valid messages so the fuzzer starts past the header checks.
[ -n "$(ls -A Fuzz/corpus 2>/dev/null)" ] || python3 Fuzz/make_seeds.py Fuzz/corpus
exec "$out/wire-fuzz" -runs="$runs" -max_len=4096 -print_final_stats=1 "$@" Fuzz/corpus
