#!/usr/bin/env python3
"""manifest_check.py TARGET [STATE]: TARGET.xxh3 (whose state, complete unless
STATE says partial, must match) lists the XXH3-64 of every cluster of
TARGET (the last one over its real length). A TARGET whose manifest says
format=qcow2 is read through qemu-img (its content as QEMU sees it). Uses libxxhash through ctypes so the
check does not share code with the daemon."""
import ctypes
import os
import subprocess
import sys
import tempfile

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
if meta.get("format", "raw") == "qcow2":
    # QEMU rounds a qcow2 disk up to whole 512-byte sectors: the rest reads as zeroes.
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(target)), suffix=".raw") as raw:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", target, raw.name], check=True)
        data = open(raw.name, "rb").read()
    if len(data) != (size + 511) // 512 * 512 or data[size:].strip(b"\0"):
        sys.exit(f"qcow2 content of {len(data)} bytes for size {size}")
    data = data[:size]
else:
    data = open(target, "rb").read()
if len(data) != size or n != (size + cs - 1) // cs or len(hashes) != n:
    sys.exit(f"size {len(data)}/{size}, clusters {n}, lines {len(hashes)}")
for c in range(n):
    chunk = data[c * cs:(c + 1) * cs]
    if int(hashes[c], 16) != xxh.XXH3_64bits(chunk, len(chunk)):
        sys.exit(f"cluster {c} hash mismatch")
print(f"manifest matches {n} clusters")
