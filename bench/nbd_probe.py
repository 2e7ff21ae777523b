#!/usr/bin/env python3
"""nbd_probe.py SOCKET EXPORT OUT: the switch probe of bench/mirror.sh over
NBD (qemu-storage-daemon cannot mirror under its writable FUSE export):
writes counter n (4 KiB) at offset 0, again and again, each acknowledged
before the next, until OUT.stop exists; OUT gets "n completion_time" lines
(time.monotonic). A minimal NBD client: fixed newstyle handshake, NBD_OPT_GO,
NBD_CMD_WRITE (no FUA: like the O_DIRECT probe on the mount), NBD_CMD_DISC."""
import os
import socket
import struct
import sys
import time

NBD_OPT_GO, NBD_REP_ACK = 7, 1
NBD_CMD_WRITE, NBD_CMD_DISC = 1, 2


def recv_all(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("NBD server closed the connection")
        data += chunk
    return data


def connect(path, export):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    magic, opt_magic, flags = struct.unpack(">8sQH", recv_all(s, 18))
    if magic != b"NBDMAGIC" or opt_magic != 0x49484156454F5054:
        sys.exit("nbd_probe: not a newstyle NBD server")
    s.sendall(struct.pack(">I", 3))   # fixed newstyle, no zeroes
    name = export.encode()
    payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, NBD_OPT_GO, len(payload)) + payload)
    while True:
        _, _, rtype, length = struct.unpack(">QIII", recv_all(s, 20))
        body = recv_all(s, length)
        if rtype == NBD_REP_ACK:
            return s
        if rtype & 0x80000000:
            sys.exit("nbd_probe: server refused the export: %r" % body)


def main():
    s = connect(sys.argv[1], sys.argv[2])
    out = sys.argv[3]
    times, n = [], 0
    while not os.path.exists(out + ".stop"):
        n += 1
        block = n.to_bytes(8, "little").ljust(4096, b"\0")
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, NBD_CMD_WRITE, n, 0, 4096) + block)
        magic, err, handle = struct.unpack(">IIQ", recv_all(s, 16))
        if magic != 0x67446698 or err or handle != n:
            sys.exit("nbd_probe: write %d failed (error %d)" % (n, err))
        times.append("%d %.6f" % (n, time.monotonic()))
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, NBD_CMD_DISC, 0, 0, 0))
    with open(out, "w") as f:
        f.write("\n".join(times) + "\n")


if __name__ == "__main__":
    main()
