#!/usr/bin/env bash
# sync=top (only the data of T, holes stay holes, bytes_total counts data
# clusters), sync=none (only what the guest overwrites, until complete or
# cancel), and fleecing=on (copy-before-write into a local store that gives
# back what the slow target holds; a store that overflows fails the job, never
# the guest).
. "$TESTS_DIR/lib.sh"

CS=65536
allocated() { echo $(( $(stat -c %b "$1") * 512 )); }

until_true() {
	local limit=$1 i
	shift
	for ((i = 0; i < limit * 20; i++)); do "$@" && return 0; sleep 0.05; done
	return 1
}

# segments FILE: the data extents as "start-end" words (SEEK_DATA/SEEK_HOLE).
segments() {
	"$PY" - "$1" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
pos, out = 0, []
while pos < size:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    out.append(f"{d}-{h}")
    pos = h
print(" ".join(out))
PY
}

# A sparse image: data islands (one ending mid-cluster, one at the odd end),
# a MiB of real zero bytes, holes between.
SIZE=$(( (32 << 20) + 5000 ))
truncate -s $SIZE "$SRC/sparse.img"
put() { head -c "$2" /dev/urandom |
	dd of="$SRC/sparse.img" bs=64K iflag=fullblock oflag=seek_bytes seek="$1" conv=notrunc status=none; }
put 0 100000
put $(( (2 << 20) + 65536 )) 65536
put $(( 5 << 20 )) 300000
put $(( SIZE - 15000 )) 15000
dd if=/dev/zero of="$SRC/sparse.img" bs=1M seek=12 count=1 conv=notrunc status=none
random_image "$SRC/vm.img" 16M
random_image "$SRC/big.img" 32M

mount_fleece

log "sync=top: only the data of T, holes stay holes"
cp --sparse=always "$SRC/sparse.img" "$T/sparse-at-T"
segs_t=$(segments "$SRC/sparse.img")
# What the target must look like: the clusters with data at T that are not all
# zero; and bytes_total: every cluster that holds an allocated extent.
read -r want_segs want_total want_alloc <<<"$("$PY" - "$T/sparse-at-T" "$segs_t" $CS <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
segs = [tuple(map(int, s.split("-"))) for s in sys.argv[2].split()]
cs = int(sys.argv[3]); size = len(data)
clusters = sorted({c for a, b in segs for c in range(a // cs, (b - 1) // cs + 1)})
total = sum(min(cs, size - c * cs) for c in clusters)
nonzero = [c for c in clusters if data[c * cs:(c + 1) * cs].strip(b"\0")]
out, start, prev = [], None, None
for c in nonzero:
    if start is None:
        start = prev = c
    elif c == prev + 1:
        prev = c
    else:
        out.append((start, prev)); start = prev = c
if start is not None:
    out.append((start, prev))
print(",".join(f"{a * cs}-{min((b + 1) * cs, size)}" for a, b in out), total,
      sum(min(cs, size - c * cs) for c in nonzero))
PY
)"
want_segs=${want_segs//,/ }
out=$(ctl "backup sparse.img $OUT/top.raw id=top sync=top speed=512K") || fail "sync=top refused: $out"
[ "$(status top sync)" = top ] || fail "status sync=$(status top sync)"
[ "$(status top bytes_total)" = "$want_total" ] ||
	fail "bytes_total=$(status top bytes_total), want $want_total (data clusters; the image is $SIZE bytes)"
# The guest writes into holes (a partial cluster, a whole one), into an island
# and into the zero MiB while the job runs.
"$PY" - "$MNT/sparse.img" <<'PY' || fail "guest writes failed"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for off, n in [((20 << 20) + 123, 5000), (7 << 20, 65536), ((30 << 20) + 9, 200000),
               ((5 << 20) + 1000, 3000), ((12 << 20) + 500, 4096), (150000, 2000)]:
    assert os.pwrite(fd, os.urandom(n), off) == n
PY
[ "$(status top state)" = running ] || fail "the job ended before the guest wrote: test too fast ($(status top state))"
[ "$(wait_job top 30)" = completed ] || fail "top: $(status top error)"
cmp "$OUT/top.raw" "$T/sparse-at-T" || fail "sync=top target differs from the image at T"
[ "$(stat -c %s "$OUT/top.raw")" = "$SIZE" ] || fail "target size $(stat -c %s "$OUT/top.raw")"
got_segs=$(segments "$OUT/top.raw")
[ "$got_segs" = "$want_segs" ] || fail "target extents '$got_segs', want '$want_segs' (image at T: '$segs_t')"
a=$(allocated "$OUT/top.raw")
[ "$a" -le $((want_alloc + CS)) ] || fail "target allocates $a bytes, the data of T is $want_alloc"
[ "$(status top bytes_done)" = "$want_total" ] || fail "bytes_done=$(status top bytes_done), want $want_total"
# The manifest lists the hash of every cluster's content at T, holes included.
soft eval 'python3 "$TESTS_DIR/manifest_check.py" "$OUT/top.raw" ||
	fail "sync=top manifest: $(sed -n "6,9p" "$OUT/top.raw.xxh3" | tr "\n" " ")..."'
[ "$(sed -n 's/^clusters=//p' "$OUT/top.raw.xxh3")" = $(( (SIZE + CS - 1) / CS )) ] || fail "sync=top manifest: clusters="

log "sync=top under concurrent unaligned writers: the target is the image at T"
truncate -s 32M "$SRC/pit.img"
for off in 1 6 13 22 29; do
	head -c 500000 /dev/urandom | dd of="$SRC/pit.img" bs=1M seek="$off" conv=notrunc status=none
done
cp --sparse=always "$SRC/pit.img" "$T/pit-base"
"$PY" "$TESTS_DIR/pit_writers.py" --mnt "$MNT" --image pit.img --base "$T/pit-base" --target "$OUT/pit.raw" \
	--options "sync=top speed=8M" --lead 0.5 --tail 0.5 --timeout 40 || fail "sync=top is not point-in-time under writers"

log "sync=none: the old data of what the guest overwrites, until complete"
cp "$SRC/vm.img" "$T/vm-at-T"
out=$(ctl "backup vm.img $OUT/none.raw id=none sync=none") || fail "sync=none refused: $out"
"$PY" - "$MNT/vm.img" "$T/none.clusters" $CS <<'PY' || fail "guest writes failed"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR); cs = int(sys.argv[3])
writes = [(3 * cs + 100, 5000), (11 * cs - 10, 20), (100 * cs, cs), (50 * cs + 7, 1), (50 * cs + 7, 1),
          ((16 << 20) - 3, 3), (200 * cs + 1000, 200000), (40 * cs + 1, 2 * cs)]
clusters = set()
for off, n in writes:
    assert os.pwrite(fd, os.urandom(n), off) == n
    clusters.update(range(off // cs, (off + n - 1) // cs + 1))
open(sys.argv[2], "w").write(" ".join(map(str, sorted(clusters))))
PY
nclusters=$(wc -w <"$T/none.clusters")
for _ in $(seq 60); do
	[ "$(status none state)" = running ] || fail "a sync=none job ended by itself: $(status none state) $(status none error)"
	sleep 0.05
done
[ "$(status none cbw_bytes)" = $((nclusters * CS)) ] || fail "cbw_bytes=$(status none cbw_bytes), the guest touched $nclusters clusters"
out=$(ctl "complete none") || fail "complete refused: $out"
[ "$(wait_job none 20)" = completed ] || fail "none: $(status none state) $(status none error)"
"$PY" - "$OUT/none.raw" "$T/vm-at-T" "$T/none.clusters" $CS <<'PY' || fail "sync=none target"
import os, sys
target = open(sys.argv[1], "rb").read(); at = open(sys.argv[2], "rb").read()
written = set(map(int, open(sys.argv[3]).read().split())); cs = int(sys.argv[4])
assert len(target) == len(at), f"target size {len(target)} != {len(at)}"
for c in range((len(at) + cs - 1) // cs):
    t, a = target[c * cs:(c + 1) * cs], at[c * cs:(c + 1) * cs]
    if c in written:
        assert t == a, f"cluster {c} (written by the guest) does not hold the data of T"
    else:
        assert not t.strip(b"\0"), f"cluster {c} (untouched) is not zero"
fd = os.open(sys.argv[1], os.O_RDONLY)
pos = 0
while True:
    try:
        d = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        break
    h = os.lseek(fd, d, os.SEEK_HOLE)
    bad = [c for c in range(d // cs, (h - 1) // cs + 1) if c not in written]
    assert not bad, f"data in the target at untouched clusters {bad[:5]}"
    pos = h
blocks = os.fstat(fd).st_blocks * 512
assert blocks <= (len(written) + 1) * cs, f"target allocates {blocks} bytes for {len(written)} clusters"
print(f"sync=none target: the {len(written)} clusters the guest wrote, holes elsewhere")
PY
ctl_expect EBUSY "complete none" >/dev/null

log "sync=none: cancel removes the target"
out=$(ctl "backup vm.img $OUT/none2.raw id=none2 sync=none") || fail "sync=none refused: $out"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); [os.pwrite(fd, os.urandom(4096), o) for o in range(0, 16<<20, 3<<20)]' "$MNT/vm.img"
[ "$(status none2 state)" = running ] || fail "none2: $(status none2 state)"
out=$(ctl "cancel none2") || fail "cancel refused: $out"
[ "$(wait_job none2 20)" = cancelled ] || fail "none2: $(status none2 state)"
[ ! -e "$OUT/none2.raw" ] && [ ! -e "$OUT/none2.raw.xxh3" ] || fail "a cancelled sync=none job left its target"

log "complete applies to sync=none only"
out=$(ctl "backup vm.img $OUT/full.raw id=full speed=1M") || fail "sync=full refused: $out"
msg=$(ctl_expect EBUSY "complete full")
case $msg in *running*) ;; *) fail "complete on a running sync=full job: '$msg' does not name the state";; esac
[ "$(status full state)" = running ] || fail "a refused complete changed the job: $(status full state)"
out=$(ctl "cancel full") || fail "cancel: $out"
[ "$(wait_job full 20)" = cancelled ] || fail "full: $(status full state)"
[ ! -e "$OUT/full.raw" ] || fail "a cancelled job left its target"

log "fleecing=on: a slow target does not slow the guest; the store gives back what the target holds"
cp "$SRC/big.img" "$T/big-at-T"
cp "$SRC/big.img" "$T/big-shadow"
# Each target write takes 100 ms: a guest write that waited for one would
# take at least that long, so half of it separates waiting from a busy machine
# (sanitizer builds under a parallel make see stalls of 20 ms).
inject "target-write from=1 delay=100"
out=$(ctl "backup big.img $OUT/fl.raw id=fl fleecing=on speed=8M") || fail "fleecing backup refused: $out"
[ "$(status fl fleecing)" = on ] || fail "status fleecing=$(status fl fleecing)"
"$PY" - "$MNT" "$SRC/.fleecefs/fleecing" "$T/big-shadow" <<'PY' || fail "fleecing under a slow target"
import os, random, sys, threading, time
mnt, store_dir, shadow_path = sys.argv[1:4]
status = os.path.join(mnt, ".fleece/jobs/fl/status")

def st():
    with open(status) as f:
        return dict(l.rstrip("\n").split("=", 1) for l in f if "=" in l)

def store_du():
    return sum(os.stat(os.path.join(store_dir, n)).st_blocks * 512 for n in os.listdir(store_dir))

samples = []   # (t, writing, store_bytes, du)
writing = threading.Event(); writing.set()
done = threading.Event()

def monitor():
    while not done.is_set():
        s = st()
        if s["state"] != "running":
            break
        try:
            du = store_du()
        except OSError:
            du = 0
        samples.append((time.monotonic(), writing.is_set(), int(s["store_bytes"]), du))
        time.sleep(0.1)
    done.set()

mon = threading.Thread(target=monitor); mon.start()
fd = os.open(os.path.join(mnt, "big.img"), os.O_RDWR)
sh = open(shadow_path, "r+b")
rng = random.Random(7)
lat = []
end = time.monotonic() + 1.2
while time.monotonic() < end:
    off = rng.randrange(12 << 20, 32 << 20) & ~4095   # mostly ahead of the copy
    data = rng.randbytes(4096)
    t0 = time.monotonic()
    n = os.pwrite(fd, data, off)
    lat.append(time.monotonic() - t0)
    assert n == 4096, n
    sh.seek(off); sh.write(data)
    time.sleep(0.003)
writing.clear()
s = st()
p99_job = int(s["cbw_wait_us_p99"])
done.wait(60)
done.set(); mon.join()
lat.sort()
p50, p99 = lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
peak = max(samples, key=lambda x: x[2])
peak_du = max(samples, key=lambda x: x[3])
after = [x for x in samples if x[0] > peak[0]]
after_du = [x for x in samples if x[0] > peak_du[0]]
print(f"{len(lat)} guest writes: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms; cbw_wait_us_p99={p99_job}; "
      f"store peak {peak[2]} bytes (du peak {peak_du[3]}), last {samples[-1][2]} (du {samples[-1][3]}), "
      f"{len(samples)} samples")
ok = True
if p99 > 0.050:
    print(f"the guest waited: p99 write latency {p99 * 1000:.1f} ms (the target delays each write by 100 ms)"); ok = False
# The job's histogram has log-linear buckets: one wait for a 100 ms target
# write puts the p99 at 98304 us or more. A busy sanitizer build on a slow
# disk reached the 49-61 ms bucket without any such wait (frozen reads of
# the background copy); the guest's own p99 above stays the strict check.
if p99_job > 90000:
    print(f"cbw_wait_us_p99={p99_job}: guest writes waited for the slow target"); ok = False
grown = max((x[2] for x in samples if x[1]), default=0)
if grown < (512 << 10):
    print(f"store_bytes did not grow while the guest wrote (at most {grown})"); ok = False
if not after or min(x[2] for x in after) > peak[2] // 4:
    print(f"store_bytes did not come back towards 0: {[x[2] for x in after][-5:]}"); ok = False
if peak_du[3] < (256 << 10) or not after_du or min(x[3] for x in after_du) > peak_du[3] // 4:
    print(f"the store file was not punched: du peak {peak_du[3]}, after {[x[3] for x in after_du][-5:]}"); ok = False
sys.exit(0 if ok else 1)
PY
[ "$(wait_job fl 60)" = completed ] || fail "fl: $(status fl state) $(status fl error)"
inject clear
cmp "$OUT/fl.raw" "$T/big-at-T" || fail "fleecing backup differs from the image at T"
cmp "$SRC/big.img" "$T/big-shadow" || fail "the image differs from what the guest wrote"
python3 "$TESTS_DIR/manifest_check.py" "$OUT/fl.raw" || fail "fleecing manifest"
[ -z "$(find "$SRC/.fleecefs/fleecing" -type f)" ] || fail "the fleecing store outlived its job: $(ls -la "$SRC/.fleecefs/fleecing")"

log "fleecing=on: a store that reaches max-store fails the job, not the guest"
cp "$SRC/big.img" "$T/big-shadow2"
inject "target-write from=1 delay=50"
out=$(ctl "backup big.img $OUT/fl2.raw id=fl2 fleecing=on max-store=512K speed=1M") || fail "refused: $out"
"$PY" - "$MNT/big.img" "$T/big-shadow2" <<'PY' || fail "a guest write failed while the fleecing store overflowed"
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR); sh = open(sys.argv[2], "r+b")
rng = random.Random(8)
for _ in range(512):   # 2 MiB of 4K blocks over the upper half: far more than 512K of clusters
    off = rng.randrange(16 << 20, 32 << 20) & ~4095
    data = rng.randbytes(4096)
    assert os.pwrite(fd, data, off) == 4096
    sh.seek(off); sh.write(data)
PY
[ "$(wait_job fl2 20)" = failed ] || fail "fl2: $(status fl2 state)"
inject clear
case $(status fl2 error) in *max-store*) ;; *) fail "fl2 error does not name max-store: $(status fl2 error)";; esac
cmp "$SRC/big.img" "$T/big-shadow2" || fail "the image differs from what the guest wrote"
[ ! -e "$OUT/fl2.raw" ] && [ ! -e "$OUT/fl2.raw.xxh3" ] || fail "the failed fleecing job left its target"
[ -z "$(find "$SRC/.fleecefs/fleecing" -type f)" ] || fail "the failed job kept its fleecing store"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
end_test
