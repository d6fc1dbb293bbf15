#!/usr/bin/env python3
"""Writes one valid packet of each session kind (docs/WIRE.md layout) as a starting corpus."""
import os, struct, sys

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
eph, ident, sig = bytes(range(32)), bytes(range(32, 64)), bytes(range(64))
seeds = {
    "init": (bytes([0x81, 1]) + struct.pack(">I", 1) + eph + struct.pack(">Q", 7) + bytes(20)).ljust(160, b"\0"),
    "response": bytes([0x82, 1]) + struct.pack(">QQ", 7, 9) + eph + ident + sig,
    "finish": bytes([0x83, 1]) + struct.pack(">QQ", 9, 7) + eph + ident + sig + struct.pack(">Q", 0) + bytes(16 + 40),
    "sealed": bytes([0x84]) + struct.pack(">QQ", 9, 3) + bytes(16 + 59),
    "unknown": bytes([0x85]) + struct.pack(">Q", 9),
    "refused": bytes([0x86, 1]) + struct.pack(">Q", 7),
    "counters": b"".join(struct.pack(">Q", c) for c in [5, 3, 70, 4, 7, 70, 200, 136, 137]),
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
