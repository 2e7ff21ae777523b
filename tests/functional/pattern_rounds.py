#!/usr/bin/env python3
"""pattern_rounds.py: the VM kit's pattern (each 8-byte word depends on
seed and offset) as the host sees it, for tests where a guest rewrites its
disk in rounds (seed 1, 2, ...) from offset 0 up.

  pattern_rounds.py wait IMAGE SEED OFFSET [TIMEOUT_S]
      waits until the word at OFFSET holds round SEED (the guest got there)
  pattern_rounds.py instant BACKUP SIZE PATTERN_TOOL
      the backup is the disk at one instant: round s up to some 64 KiB
      boundary, round s-1 after it (checked word by word with the kit's
      own `pattern verify`)"""
import struct
import subprocess
import sys
import time

M = (1 << 64) - 1


def word(seed, off):
    x = ((seed * 0x9E3779B97F4A7C15) & M) ^ off
    x ^= x >> 33
    x = (x * 0xff51afd7ed558ccd) & M
    x ^= x >> 33
    return x


def wait(path, seed, off, timeout=200.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            f.seek(off)
            if struct.unpack("<Q", f.read(8))[0] == word(seed, off):
                return 0
        time.sleep(0.02)
    return 1


def instant(path, size, pattern):
    data = open(path, "rb").read()
    first = lambda off: struct.unpack_from("<Q", data, off)[0]
    seed = next((s for s in range(1, 20) if first(0) == word(s, 0)), None)
    if not seed:
        sys.exit("chunk 0 holds no round's pattern")
    x = next((o for o in range(0, size, 65536) if first(o) != word(seed, o)), size)
    for s, a, b in ((seed, 0, x), (seed - 1, x, size)):
        if b > a and subprocess.run([pattern, "verify", path, str(s), str(a), str(b - a)]).returncode:
            sys.exit(f"round {s} does not hold on [{a}, {b})")
    print(f"backup = round {seed} up to offset {x}, round {seed - 1} after it")
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wait":
        sys.exit(wait(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 200.0))
    sys.exit(instant(args[0], int(args[1]), args[2]))
