#!/usr/bin/env python3
"""Point-in-time check under concurrent, unaligned writers.

Several writer threads write through the mount while a backup starts and runs.
Every byte of the image belongs to exactly one writer (so each writer's own
order defines the byte's history): small writers own interleaved stripes of
STRIPE bytes in the lower half (a stripe is not a divisor of the cluster size,
so stripes and writes straddle clusters and several writers race on one
cluster), the big writer owns the upper half and writes up to 1.1 MiB at a time
at unaligned offsets. Write data is regenerated from (writer, seq), so nothing
is kept in memory but offsets and times.

With --snapshot NAME the writers race a snapshot instead: its view
(.fleece/snapshots/NAME/IMAGE) is read once while they write and once after,
both reads must be equal, and the view is the "target" below.

Afterwards:
  * the image must equal the base plus every write, in each writer's order;
  * the target must equal the base plus, for each writer, a prefix of its
    writes (a cut), and the cuts must be consistent with one instant T:
    every included write started before every excluded write ended.
Exit status 0 on success; prints what differs otherwise.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

STRIPE = 3000


def qcow2_content(path):
    """What qemu-img reads from a qcow2 file (after qemu-img check found it clean)."""
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", path], capture_output=True, text=True)
    if check.returncode != 0:
        print("qemu-img check:", check.returncode, check.stdout.strip(), check.stderr.strip())
        return None
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".raw") as raw:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, raw.name], check=True)
        return open(raw.name, "rb").read()


# Every run writes data (and picks offsets) no earlier run wrote: runs follow
# one another on one image, and a write whose bytes the base already holds
# (the same write of the run before) is in any cut, so the checker could
# count it in after a write that ended before it started was out.
RUN = os.urandom(8).hex()


def data_for(writer, seq, length):
    return random.Random(f"{RUN}:{writer}:{seq}").randbytes(length)


class Writer(threading.Thread):
    def __init__(self, index, fd, spans, stop, big, pace, chase=None):
        super().__init__(daemon=True)
        self.index, self.fd, self.spans, self.stop, self.big, self.pace = index, fd, spans, stop, big, pace
        self.chase = chase  # status file of the job whose background copy to chase
        self.log = []  # (t_start, t_end, off, length)
        self.error = None

    def near_background_copy(self, rng):
        """A span of ours just ahead of where the background copy works now."""
        try:
            with open(self.chase) as f:
                st = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        except OSError:
            return None
        if st.get("state") != "running":
            return None
        pos = int(st["bytes_done"]) - int(st["cbw_bytes"])
        near = [s for s in self.spans if pos <= s[0] < pos + (1 << 20)]
        return near[rng.randrange(len(near))] if near else None

    def run(self):
        rng = random.Random(f"{RUN}:{self.index}")
        seq = 0
        span = None
        try:
            while not self.stop.is_set():
                if self.chase and seq % 10 == 0:
                    span = self.near_background_copy(rng)
                lo, hi = span if span else self.spans[rng.randrange(len(self.spans))]
                if self.big:
                    length = rng.randint(1, min(hi - lo, 1100 * 1024))
                else:
                    length = rng.randint(1, hi - lo)
                off = rng.randint(lo, hi - length)
                data = data_for(self.index, seq, length)
                t0 = time.monotonic()
                n = os.pwrite(self.fd, data, off)
                t1 = time.monotonic()
                if n != length:
                    raise OSError(f"short write {n} of {length} at {off}")
                self.log.append((t0, t1, off, length))
                seq += 1
                if self.pace:
                    time.sleep(self.pace)
        except Exception as e:  # reported by the main thread
            self.error = e


def ctl(path, text):
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.monotonic()
        os.write(fd, (text + "\n").encode())
        t1 = time.monotonic()
        answer = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    return t0, t1, answer


def job_state(mnt, job):
    with open(os.path.join(mnt, ".fleece/jobs", job, "status")) as f:
        return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


def read_request_max(mnt):
    """The largest write request the mount gets (.fleece/version)."""
    with open(os.path.join(mnt, ".fleece/version")) as f:
        for line in f:
            if line.startswith("ctl_max_write="):
                return int(line.split("=", 1)[1])
    return 1 << 20


def apply(image, writer, entries):
    for seq, (_, _, off, length) in entries:
        image[off:off + length] = data_for(writer, seq, length)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnt", required=True)
    ap.add_argument("--image", default="vm.img")
    ap.add_argument("--base", required=True, help="copy of the image before the writers start")
    ap.add_argument("--target", default="", help="the backup (not with --snapshot)")
    ap.add_argument("--writers", type=int, default=6)
    ap.add_argument("--lead", type=float, default=1.0, help="seconds of writing before the backup")
    ap.add_argument("--tail", type=float, default=2.0, help="seconds of writing after the job ends")
    ap.add_argument("--options", default="", help="extra backup options")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--qcow2", action="store_true",
                    help="the target is qcow2: qemu-img check must pass, and its content is read through qemu-img")
    ap.add_argument("--pace", type=float, default=0.002, help="pause of the small writers between writes")
    ap.add_argument("--big-pace", type=float, default=0.05, help="pause of the big writer between writes")
    ap.add_argument("--snapshot", metavar="NAME", help="take snapshot NAME (with --options) instead of a backup")
    ap.add_argument("--hold", type=float, default=3.0, help="--snapshot: seconds of writing after it")
    ap.add_argument("--expect", action="append", default=[], metavar="KEY=positive|zero",
                    help="a status key of the job and what it must be at the end")
    args = ap.parse_args()

    path = os.path.join(args.mnt, args.image)
    size = os.path.getsize(path)
    half = size // 2
    stripes = [(o, min(o + STRIPE, half)) for o in range(0, half, STRIPE)]
    fd = os.open(path, os.O_RDWR)
    stop = threading.Event()
    writers = []
    job = args.snapshot or "pit"
    status = os.path.join(args.mnt, ".fleece/jobs", job, "status")
    for w in range(args.writers):
        # Writer 0 chases the background copy, so that guest writes race it
        # for the very clusters it is copying.
        writers.append(Writer(w, fd, stripes[w::args.writers], stop, False, args.pace,
                              status if w == 0 and not args.snapshot else None))
    writers.append(Writer(args.writers, fd, [(half, size)], stop, True, args.big_pace))
    for w in writers:
        w.start()

    time.sleep(args.lead)
    if args.snapshot:
        return check_snapshot(args, path, size, writers, stop, fd)
    t0, t1, answer = ctl(os.path.join(args.mnt, ".fleece/ctl"),
                         f"backup {args.image} {args.target} id={job} {args.options}".strip())
    if not answer.startswith("ok"):
        print("backup refused:", answer)
        return 1
    deadline = time.monotonic() + args.timeout
    while True:
        st = job_state(args.mnt, job)
        if st["state"] in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            print("job did not finish:", st)
            return 1
        time.sleep(0.05)
    time.sleep(args.tail)
    if not stop_writers(writers, stop, fd):
        return 1
    if st["state"] != "completed":
        print("job ended", st["state"], st.get("error"))
        return 1
    nwrites = sum(len(w.log) for w in writers)
    print(f"{nwrites} writes, backup took {float(st['finished']) - float(st['started']):.2f}s, "
          f"cbw_bytes={st['cbw_bytes']} cbw_wait_us_p50={st['cbw_wait_us_p50']} p99={st['cbw_wait_us_p99']}")
    if not expectations_hold(st, args.expect):
        return 1
    if args.qcow2:
        target = qcow2_content(args.target)
        if target is None:
            return 1
    elif args.target.startswith("nbd"):
        # An export, read through an NBD client; it may be larger than the image.
        target = subprocess.run(["nbdcopy", "--", args.target, "-"], capture_output=True, check=True).stdout
        target = target[:size] if len(target) >= size else target
    else:
        target = open(args.target, "rb").read()
    return check_cut(args, path, size, writers, t0, t1, target)


def stop_writers(writers, stop, fd):
    """Stops the writers; False (said why) if one failed."""
    stop.set()
    for w in writers:
        w.join()
    os.close(fd)
    for w in writers:
        if w.error:
            print(f"writer {w.index} failed: {w.error}")
            return False
    return True


def expectations_hold(st, expect):
    for e in expect:
        key, want = e.split("=", 1)
        got = int(st.get(key, "-1"))
        if (want == "positive" and got <= 0) or (want == "zero" and got != 0):
            print(f"status {key}={got}, want {want}")
            return False
        print(f"status {key}={got} ({want})")
    return True


def check_snapshot(args, path, size, writers, stop, fd):
    t0, t1, answer = ctl(os.path.join(args.mnt, ".fleece/ctl"),
                         f"snapshot {args.snapshot} {args.image} {args.options}".strip())
    if not answer.startswith("ok"):
        print("snapshot refused:", answer)
        stop.set()
        return 1
    view = os.path.join(args.mnt, ".fleece/snapshots", args.snapshot, os.path.basename(args.image))
    time.sleep(args.hold / 2)
    during = open(view, "rb").read()
    time.sleep(args.hold / 2)
    if not stop_writers(writers, stop, fd):
        return 1
    target = open(view, "rb").read()
    if during != target:
        diff = next(i for i in range(size) if during[i] != target[i])
        print(f"the view read while writers wrote differs from the view after, at offset {diff}")
        return 1
    st = job_state(args.mnt, args.snapshot)
    print(f"{sum(len(w.log) for w in writers)} writes during the snapshot, cbw_bytes={st['cbw_bytes']} "
          f"store_bytes={st['store_bytes']}")
    if not expectations_hold(st, args.expect):
        return 1
    return check_cut(args, path, size, writers, t0, t1, target)


def describe_mismatch(w, candidates, expected, target, t0, t1):
    """Which bytes of each write around T the target holds: new (the write),
    old (the image before it) or neither, as runs, for the log."""
    print(f"  the command ran from {t0:.6f} to {t1:.6f}")
    for seq, (s, e, off, length) in candidates:
        new = data_for(w.index, seq, length)
        runs = []
        for i in range(length):
            g = target[off + i]
            kind = "new" if g == new[i] and g != expected[off + i] else "old" if g == expected[off + i] else "neither"
            if runs and runs[-1][0] == kind:
                runs[-1][2] = i + 1
            else:
                runs.append([kind, i, i + 1])
        print(f"  write {seq}: offset {off} length {length}, {s:.6f}..{e:.6f}: "
              + ", ".join(f"{k} {a}-{b}" for k, a, b in runs[:20]) + (" ..." if len(runs) > 20 else ""))


def check_cut(args, path, size, writers, t0, t1, target):
    base = open(args.base, "rb").read()
    # 1. The image is the base plus every write.
    final = bytearray(base)
    for w in writers:
        apply(final, w.index, enumerate(w.log))
    if open(path, "rb").read() != final:
        print("image differs from the base plus all acknowledged writes")
        return 1

    # 2. The target is a consistent cut.
    if len(target) != size:
        print(f"target size {len(target)} != {size}")
        return 1
    expected = bytearray(base)
    cuts = []
    for w in writers:
        definite = [(s, e) for s, e in enumerate(w.log) if e[1] < t0]
        apply(expected, w.index, definite)
        candidates = [(s, e) for s, e in enumerate(w.log) if not e[1] < t0 and not e[0] > t1]
        cuts.append((w, len(definite), candidates))
    # The kernel cuts a write into requests of at most `request` bytes (less
    # the buffer's offset in its page), sent one after the other: a write in
    # flight at T may be in the target up to such a cut, as a block device
    # may hold part of a multi-sector request that was not acknowledged.
    # A request also ends early where copying the caller's buffer into the
    # page cache comes up short (a page of the buffer not mapped at that
    # moment, e.g. while it migrates), so the cut can fall at any byte: what
    # is checked is the shape, the write's own data up to the cut and the
    # data from before it after the cut, in one instant with the others.
    request = read_request_max(args.mnt)
    chosen = []
    for w, ndef, candidates in cuts:
        # Try every prefix of the ambiguous writes (the last one possibly cut
        # at a request boundary); the bytes they touch must match one history.
        touched = sorted({(e[2], e[2] + e[3]) for _, e in candidates})
        best = None
        trial = None
        for j in range(len(candidates) + 1):
            trial = bytearray(expected) if j == 0 else trial
            if j:
                apply(trial, w.index, [candidates[j - 1]])
            if all(trial[a:b] == target[a:b] for a, b in touched):
                best = (j, bytearray(trial))
            elif best is None and j < len(candidates):
                seq, (_, _, off, length) = candidates[j]
                new = data_for(w.index, seq, length)
                got = target[off:off + length]
                cut = next((i for i in range(length) if got[i] != new[i]), length)
                if 0 < cut < length and got[cut:] == trial[off + cut:off + length]:
                    part = bytearray(trial)
                    part[off:off + cut] = new[:cut]
                    if all(part[a:b] == target[a:b] for a, b in touched):
                        where = "its request size" if request - 4096 < cut <= request + 8 else "a short copy"
                        print(f"writer {w.index}: write {seq} of {length} bytes is in the target up to a "
                              f"request cut at {cut} ({where})")
                        best = (j + 1, part)
        if best is None:
            print(f"writer {w.index}: no prefix of its {len(candidates)} writes around T matches the target")
            describe_mismatch(w, candidates, expected, target, t0, t1)
            return 1
        j, trial = best
        for a, b in touched:
            expected[a:b] = trial[a:b]
        chosen.append((w, ndef + j))
    if bytes(expected) != target:
        diff = next(i for i in range(size) if expected[i] != target[i])
        print(f"target differs from the image at T at offset {diff}")
        return 1
    latest_in = max((w.log[n - 1][0] for w, n in chosen if n), default=float("-inf"))
    earliest_out = min((w.log[n][1] for w, n in chosen if n < len(w.log)), default=float("inf"))
    if not latest_in < earliest_out:
        print(f"cuts are not one instant: a write started at {latest_in} is in, one that ended at "
              f"{earliest_out} is out")
        return 1
    ambiguous = sum(len(c) for _, _, c in cuts)
    print(f"target equals the image at T ({ambiguous} writes were in flight around T)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
