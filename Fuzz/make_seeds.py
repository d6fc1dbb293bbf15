#!/usr/bin/env python3
"""Writes a few valid wire messages (docs/WIRE.md layout) as a starting corpus for the fuzzer."""
import os, struct, sys

def header(msg_type, sections, flags=0):
    return (struct.pack(">BIIBHB", 1, 1, 42, msg_type, 0x1234, flags)
            + bytes(20) + struct.pack(">HHB", 4000, 4000, 0) + bytes(range(20)) + bytes([sections]))

def peer(i, v6=False):
    ip = (bytes([6]) + bytes(15) + bytes([i])) if v6 else (bytes([4, 127, 0, 0, i]))
    return bytes([i] * 20) + ip + struct.pack(">HH", 4000 + i, 4000 + i) + bytes([0, 0])

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
seeds = {
    "ping": header(0, 0),
    "neighbors": header(0, 1) + bytes([1]) + struct.pack(">H", 1) + bytes(range(20)),
    "reply20": header(2, 1) + bytes([3]) + struct.pack(">H", 20) + b"".join(peer(i, i % 3 == 0) for i in range(20)),
    "bytes": header(2, 2) + bytes([4]) + struct.pack(">I", 5) + b"hello" + bytes([5]) + struct.pack(">q", -1),
    "map": header(0, 1) + bytes([6]) + struct.pack(">I", 1) + bytes(80) + struct.pack(">I", 3) + b"abc",
    "keys640": header(0, 1) + bytes([2]) + struct.pack(">H", 1) + bytes(80),
    "signed": header(0, 0, flags=1) + bytes(96),
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
