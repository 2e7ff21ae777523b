#!/usr/bin/env python3
"""qmp_mirror.py: drives qemu-storage-daemon's blockdev-mirror for
bench/mirror.sh through its QMP socket.

  qmp_mirror.py SOCK start TARGET MODE   blockdev-add TARGET (raw file, must
                                          exist at the image's size), then
                                          blockdev-mirror of fmt0 onto it
  qmp_mirror.py SOCK wait-ready          until the job is ready; prints the
                                          monotonic time it saw it
  qmp_mirror.py SOCK complete            job-complete; waits until concluded
  qmp_mirror.py SOCK cancel              block-job-cancel; waits until gone
  qmp_mirror.py SOCK quit
"""
import json
import socket
import sys
import time

JOB = "bench-mirror"


class Mon:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.025)
        else:
            sys.exit("qmp: cannot connect to " + path)
        self.f = self.s.makefile("rw")
        self.read()
        self.must(self.cmd("qmp_capabilities"))

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("qmp connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            m = self.read()
            if "event" not in m:
                return m

    def must(self, r):
        if "error" in r:
            sys.exit("qmp: " + json.dumps(r["error"]))
        return r["return"]

    def job(self):
        return next((j for j in self.must(self.cmd("query-jobs")) if j["id"] == JOB), None)


def main():
    mon, mode = Mon(sys.argv[1]), sys.argv[2]
    if mode == "start":
        target, copy_mode = sys.argv[3], sys.argv[4]
        mon.must(mon.cmd("blockdev-add", **{"node-name": "mirror-tgt", "driver": "raw",
                                            "file": {"driver": "file", "filename": target}}))
        mon.must(mon.cmd("blockdev-mirror", **{"job-id": JOB, "device": "fmt0", "target": "mirror-tgt",
                                               "sync": "full", "copy-mode": copy_mode,
                                               "auto-dismiss": False}))
    elif mode == "wait-ready":
        while True:
            j = mon.job()
            if j is None or j["status"] in ("concluded", "null", "aborting"):
                sys.exit("qmp: the mirror ended before it was ready: %s" % (j or {}).get("error"))
            if j["status"] == "ready":
                print("%.6f" % time.monotonic())
                return
            time.sleep(0.005)
    elif mode in ("complete", "cancel"):
        if mode == "complete":
            mon.must(mon.cmd("job-complete", id=JOB))
        else:
            mon.must(mon.cmd("block-job-cancel", device=JOB, force=True))
        while True:
            j = mon.job()
            if j is None or j["status"] == "concluded":
                break
            time.sleep(0.005)
        if j is not None:
            err = j.get("error")
            mon.cmd("job-dismiss", id=JOB)
            if err and mode == "complete":
                sys.exit("qmp: mirror failed: " + err)
        if mode == "cancel":
            mon.cmd("blockdev-del", **{"node-name": "mirror-tgt"})
    elif mode == "quit":
        mon.cmd("quit")


if __name__ == "__main__":
    main()
