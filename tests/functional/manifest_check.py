#!/usr/bin/env python3
"""manifest_check.py TARGET [STATE]: TARGET.xxh3 (whose state, complete unless
STATE says partial, must match) lists the XXH3-64 of every cluster of
TARGET (the last one over its real length). Uses libxxhash through ctypes so
the check does not share code with the daemon."""
import ctypes
import sys

xxh = ctypes.CDLL("libxxhash.so.0")
xxh.XXH3_64bits.restype = ctypes.c_uint64
xxh.XXH3_64bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

target = sys.argv[1]
lines = open(target + ".xxh3").read().splitlines()
if lines[0] != "fleecefs-manifest 1":
    sys.exit(f"bad header {lines[0]!r}")
# key=value header lines up to the first checksum
head = 1
while head < len(lines) and "=" in lines[head]:
    head += 1
meta = dict(l.split("=", 1) for l in lines[1:head])
if meta.get("algorithm") != "xxh3-64":
    sys.exit(f"algorithm {meta.get('algorithm')}")
want_state = sys.argv[2] if len(sys.argv) > 2 else "complete"
if meta.get("state", "complete") != want_state:
    sys.exit(f"state={meta.get('state', 'complete')}, want {want_state}")
size, cs, n = int(meta["size"]), int(meta["cluster_size"]), int(meta["clusters"])
hashes = lines[head:]
data = open(target, "rb").read()
if len(data) != size or n != (size + cs - 1) // cs or len(hashes) != n:
    sys.exit(f"size {len(data)}/{size}, clusters {n}, lines {len(hashes)}")
for c in range(n):
    chunk = data[c * cs:(c + 1) * cs]
    if int(hashes[c], 16) != xxh.XXH3_64bits(chunk, len(chunk)):
        sys.exit(f"cluster {c} hash mismatch")
print(f"manifest matches {n} clusters")
