#!/usr/bin/env bash
# Snapshots and their views (.fleece/snapshots/NAME/IMAGE): reads racing guest
# writes never see new data (64K and 4K clusters), several images at one point
# in time, views behave like frozen read-only files (stat, SEEK_DATA/SEEK_HOLE,
# nested paths) that tar, qemu-img and cp read without noticing the guest, a
# view is an IMAGE for backup, release, stores removed on release, unmount and
# after a crash, a store that overflows (max-store, ENOSPC) ends the snapshot
# and never the guest, and the command errors.
. "$TESTS_DIR/lib.sh"

SNAPS=.fleece/snapshots
allocated() { echo $(( $(stat -c %b "$1") * 512 )); }
store_dir() { echo "${STATE:-$SRC/.fleecefs}/snapshots/$1"; }

# until_true SECONDS CMD...: polls CMD every 50 ms; fails after SECONDS.
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

# ---------------------------------------------------------------------------
# Reads of a view racing unaligned guest writes to the same clusters.
# race SNAPSHOT CLUSTER_SIZE LABEL: $SRC/vm.img must be idle. For ~5 s, in
# rounds: takes the snapshot, then writers sweep the image cluster by cluster
# while readers hammer the cluster being written for the first time since T
# and the next one (plus 1 MiB reads anywhere): every read must return the
# data of T. At the end of a round the whole view must equal T; the next
# round releases it and snapshots again. The last snapshot stays, its content
# of T in $T/at-T, and the image must equal T plus every write ($T/shadow).
race() {
	local name=$1 cs=$2 label=$3
	"$PY" - "$MNT" "$name" "$cs" 5 "$T/at-T" "$T/shadow" <<'PY' || fail "$label: read race failed"
import os, random, sys, threading, time

mnt, name, cs, duration = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
at_path, shadow_path = sys.argv[5], sys.argv[6]
image = os.path.join(mnt, "vm.img")
view = os.path.join(mnt, ".fleece/snapshots", name, "vm.img")
ctl_path = os.path.join(mnt, ".fleece/ctl")
shadow = bytearray(open(image, "rb").read())
size = len(shadow)
MB = 1 << 20
NSMALL, NBIG, NREAD = 4, 2, 3
SMALL_STRIPE = 3001          # many small writers share every cluster
SMALL_REGION = 196608 + 1234 # of each MiB; the rest is split between the big writers
nclusters = size // cs

def ctl(text):
    fd = os.open(ctl_path, os.O_RDWR)
    try:
        os.write(fd, (text + "\n").encode())
    except OSError as e:
        raise OSError(f"{text}: {os.read(fd, 4096).decode().strip()} ({e})")
    finally:
        os.close(fd)

# Every byte has one owner, so each owner's order gives the final content.
# own_at[w][c]: the spans of writer w that meet cluster c.
spans = {w: [] for w in range(NSMALL + NBIG)}
for base in range(0, size, MB):
    for i, lo in enumerate(range(base, base + SMALL_REGION, SMALL_STRIPE)):
        spans[i % NSMALL].append((lo, min(lo + SMALL_STRIPE, base + SMALL_REGION)))
    mid = base + SMALL_REGION + (MB - SMALL_REGION) // 2
    spans[NSMALL].append((base + SMALL_REGION, mid))
    spans[NSMALL + 1].append((mid, base + MB))
own_at = {w: {} for w in spans}
for w, lst in spans.items():
    for lo, hi in lst:
        for c in range(lo // cs, (hi - 1) // cs + 1):
            own_at[w].setdefault(c, []).append((lo, hi))

hot = 0                      # writers write cluster `hot`; readers read it and the next
go = threading.Event()
idle = [threading.Event() for _ in range(NSMALL + NBIG + NREAD)]
leave = False
errors = []
stats = {"writes": 0, "reads": 0, "big_reads": 0, "rounds": 0, "fresh": 0}
at = b""

def writer(w):
    rng = random.Random(w * 7919 + 1)
    fd = os.open(image, os.O_RDWR)
    maxlen = SMALL_STRIPE if w < NSMALL else 200000
    try:
        while True:
            idle[w].set(); go.wait(); idle[w].clear()
            if leave:
                return
            while go.is_set():
                c = hot
                cand = own_at[w].get(c)
                if not cand:
                    time.sleep(0.0002)
                    continue
                lo, hi = rng.choice(cand)
                length = rng.randint(1, min(maxlen, hi - lo))
                # A write that meets cluster c, often straddling its edges.
                a, b = max(lo, c * cs - length + 1), min(hi - length, (c + 1) * cs - 1)
                if a > b:
                    a, b = lo, hi - length
                off = rng.randint(a, b)
                data = rng.randbytes(length)
                n = os.pwrite(fd, data, off)
                if n != length:
                    raise OSError(f"short write {n} of {length} at {off}")
                shadow[off:off + length] = data
                stats["writes"] += 1
    except Exception as e:
        errors.append(f"writer {w}: {e!r}")
        go.clear()
    finally:
        os.close(fd)

def reader(r):
    rng = random.Random(r * 104729 + 2)
    me = idle[NSMALL + NBIG + r]
    try:
        while True:
            me.set(); go.wait(); me.clear()
            if leave:
                return
            fd = os.open(view, os.O_RDONLY)
            while go.is_set():
                if rng.random() < 0.05:
                    length, off = MB, rng.randrange(0, size)
                    stats["big_reads"] += 1
                else:
                    c = hot + rng.randint(0, 1)
                    off = max(0, min(size - 1, c * cs + rng.randint(-1000, cs - 1)))
                    length = rng.randint(1, cs + 2000)
                got = os.pread(fd, length, off)
                stats["reads"] += 1
                want = at[off:off + length]
                if got != want:
                    i = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), min(len(got), len(want)))
                    errors.append(f"reader {r}: read of {length} at {off} (snapshot {stats['rounds']}) returned "
                                  f"{len(got)} bytes, differing from T at byte {off + i}")
                    go.clear()
            os.close(fd)
    except Exception as e:
        errors.append(f"reader {r}: {e!r}")
        go.clear()

threads = [threading.Thread(target=writer, args=(w,)) for w in range(NSMALL + NBIG)]
threads += [threading.Thread(target=reader, args=(r,)) for r in range(NREAD)]
for t in threads:
    t.start()
t_end = time.monotonic() + duration
try:
    while time.monotonic() < t_end and not errors:
        for e in idle:
            e.wait()
        at = bytes(shadow)           # nothing in flight: the shadow is the image
        if stats["rounds"]:
            ctl(f"release {name}")
        ctl(f"snapshot {name} vm.img")
        stats["rounds"] += 1
        hot = 0
        go.set()
        # (the last round, however late, sweeps some clusters too)
        while hot < nclusters - 2 and (time.monotonic() < t_end or hot < 64) and not errors:
            time.sleep(0.004)
            hot += 1
            stats["fresh"] += 1
        go.clear()
        for e in idle:
            e.wait()
        if not errors and open(view, "rb").read() != at:
            errors.append(f"snapshot {stats['rounds']}: the whole view differs from T")
except Exception as e:
    errors.append(repr(e))
leave = True
go.set()
for t in threads:
    t.join()
print(f"{stats['rounds']} snapshots, {stats['fresh']} clusters first written under readers, "
      f"{stats['writes']} writes, {stats['reads']} view reads ({stats['big_reads']} of 1 MiB)")
if errors:
    print("\n".join(errors[:10]))
    sys.exit(1)
if stats["writes"] < 500 or stats["reads"] < 500 or stats["fresh"] < 200:
    print("too little happened to mean anything")
    sys.exit(1)
open(at_path, "wb").write(at)
open(shadow_path, "wb").write(shadow)
PY
	cmp "$MNT/$SNAPS/$name/vm.img" "$T/at-T" || fail "$label: the whole view differs from the image at T"
	cmp "$SRC/vm.img" "$T/shadow" || fail "$label: the image differs from T plus every write"
	cmp "$MNT/vm.img" "$T/shadow" || fail "$label: the image read through the mount differs"
	[ "$(status "$name" state)" = running ] || fail "$label: snapshot $(status "$name" state): $(status "$name" error)"
	[ "$(status "$name" cbw_bytes)" -gt 0 ] || fail "$label: nothing was copied before write"
	# The store holds the old data of each cluster at most once.
	local sb cb
	sb=$(status "$name" store_bytes) cb=$(status "$name" cbw_bytes)
	log "$label: store_bytes=$sb cbw_bytes=$cb"
	soft eval '[ "$sb" -le $((32 << 20)) ] && [ "$sb" = "$cb" ] ||
		fail "$label: store_bytes=$sb, but cbw_bytes=$cb and the store file holds $(du -s --block-size=1 "$(store_dir "$name")" | cut -f1) bytes"'
}

# ---------------------------------------------------------------------------
random_image "$SRC/vm.img" 32M
# A sparse image: cluster-aligned data islands, holes between, a hole at the end.
truncate -s $(( (16 << 20) + 12345 )) "$SRC/sparse.img"
for off in 0 3 7 12; do
	head -c 131072 /dev/urandom | dd of="$SRC/sparse.img" bs=1M seek="$off" conv=notrunc status=none
done
head -c 65536 /dev/urandom | dd of="$SRC/sparse.img" bs=64K seek=$(( (15 << 20) / 65536 + 3 )) conv=notrunc status=none
random_image "$SRC/a.img" 1M
random_image "$SRC/b.img" 1M
mkdir -p "$SRC/pool/deep"
random_image "$SRC/pool/deep/vm.img" 4M

mount_fleece

log "64K clusters: view reads racing unaligned guest writes return the data of T"
race s1 65536 "64K clusters"

log "two images, one point in time"
"$PY" - "$MNT/a.img" "$MNT/b.img" "$T/lockstep.stop" <<'PY' &
import os, struct, sys
a = os.open(sys.argv[1], os.O_RDWR); b = os.open(sys.argv[2], os.O_RDWR)
n = 0
while not os.path.exists(sys.argv[3]):
    n += 1
    block = struct.pack("<Q", n) * 512
    assert os.pwrite(a, block, 0) == 4096
    assert os.pwrite(b, block, 0) == 4096
    if n % 64 == 0:   # also touch the rest, so that every snapshot copies
        assert os.pwrite(a, block, 4096 * (n % 255 + 1)) == 4096
PY
LOCKSTEP=$!
BG_PIDS+=("$LOCKSTEP")
prev=0
for i in 1 2 3 4 5; do
	sleep 0.2
	out=$(ctl "snapshot s2 a.img b.img") || fail "snapshot of two images refused: $out"
	seqs=$("$PY" - "$MNT/$SNAPS/s2/a.img" "$MNT/$SNAPS/s2/b.img" <<'PY'
import struct, sys
def seq(p):
    block = open(p, "rb").read(4096)
    words = set(struct.unpack("<512Q", block))
    assert len(words) == 1, f"{p}: torn block {sorted(words)[:4]}"
    return words.pop()
import time
first = seq(sys.argv[1]), seq(sys.argv[2])
time.sleep(0.1)   # the writer goes on; the views do not move
again = seq(sys.argv[1]), seq(sys.argv[2])
assert again == first, f"the views moved from {first} to {again}"
print(*first)
PY
) || fail "reading the views of s2"
	read -r sa sb <<<"$seqs"
	log "snapshot $i: a=$sa b=$sb"
	{ [ "$sa" = "$sb" ] || [ "$sa" = $((sb + 1)) ]; } || fail "snapshot $i: a.img at $sa, b.img at $sb: not one point in time"
	[ "$sa" -gt "$prev" ] || fail "snapshot $i: the writer made no progress ($sa after $prev)"
	prev=$sa
	[ "$(status s2 images)" = 2 ] || fail "s2 images=$(status s2 images)"
	out=$(ctl "release s2") || fail "release s2 refused: $out"
	[ ! -e "$MNT/.fleece/jobs/s2" ] || fail "release left the job"
done
touch "$T/lockstep.stop"
wait "$LOCKSTEP" || fail "the lock-step writer failed"

log "views are frozen read-only files"
cp --sparse=always "$SRC/sparse.img" "$T/sparse-at-T"
segs_t=$(segments "$SRC/sparse.img")
stat_t=$(stat -c '%s %Y %Z %b' "$SRC/sparse.img")
stat_ns_t=$("$PY" -c 'import os,sys; s=os.stat(sys.argv[1]); print(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_blocks)' "$SRC/sparse.img")
sleep 0.02   # so that guest writes change mtime and ctime
out=$(ctl "snapshot s3 sparse.img vm.img pool/deep/vm.img") || fail "snapshot s3 refused: $out"
cp "$SRC/vm.img" "$T/vm-at-s3"
cp "$SRC/pool/deep/vm.img" "$T/deep-at-s3"
V=$MNT/$SNAPS/s3
view_stat() { "$PY" -c 'import os,sys; s=os.stat(sys.argv[1]); print(s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_blocks, s.st_ino)' "$1"; }
v0=$(view_stat "$V/sparse.img")
[ "${v0% *}" = "$stat_ns_t" ] || fail "view stat (size mtime ctime blocks) '${v0% *}', image at T '$stat_ns_t'"
[ "$(stat -c '%s %Y %Z %b' "$V/sparse.img")" = "$stat_t" ] || fail "stat(1) of the view differs from the image at T"
[ "$(segments "$V/sparse.img")" = "$segs_t" ] || fail "view data extents '$(segments "$V/sparse.img")', image at T '$segs_t'"
# The guest writes into holes (partial and whole clusters) and into islands.
"$PY" - "$MNT/sparse.img" <<'PY' || fail "guest writes to sparse.img failed"
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
rng = random.Random(3)
for off, n in [((5 << 20) + 777, 3000), ((9 << 20), 65536), ((14 << 20) + 5, 200000),
               ((3 << 20) + 1000, 5000), (12345, 7)]:
    assert os.pwrite(fd, rng.randbytes(n), off) == n
PY
[ "$(segments "$SRC/sparse.img")" != "$segs_t" ] || fail "the guest's writes did not change the image's extents"
v1=$(view_stat "$V/sparse.img")
[ "$v1" = "$v0" ] || fail "view stat changed while the guest wrote: '$v1', was '$v0'"
[ "$(segments "$V/sparse.img")" = "$segs_t" ] || fail "view extents after guest writes into holes: '$(segments "$V/sparse.img")', at T '$segs_t'"
cmp "$V/sparse.img" "$T/sparse-at-T" || fail "sparse view differs from the image at T"
# The guest grows the image: the view keeps its size, content and holes.
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); assert os.pwrite(fd, b"x"*70000, os.fstat(fd).st_size) == 70000' "$MNT/sparse.img"
[ "$(view_stat "$V/sparse.img")" = "$v0" ] || fail "view stat changed when the image grew: $(view_stat "$V/sparse.img")"
cmp "$V/sparse.img" "$T/sparse-at-T" || fail "sparse view differs from the image at T after it grew"
soft eval '[ "$(segments "$V/sparse.img")" = "$segs_t" ] ||
	fail "view extents after the guest appended to the image: $(segments "$V/sparse.img"), at T $segs_t"'
expect EACCES 'os.open(A[0], os.O_WRONLY)' "$V/sparse.img"
expect EACCES 'os.open(A[0], os.O_RDWR)' "$V/sparse.img"
expect EBADF 'fd = os.open(A[0], os.O_RDONLY); os.write(fd, b"x")' "$V/sparse.img"
[ "$(pyerr 'os.truncate(A[0], 0)' "$V/sparse.img")" != OK ] || fail "truncate of a view succeeded"
[ "$(pyerr 'os.unlink(A[0])' "$V/sparse.img")" != OK ] || fail "unlink of a view succeeded"
[ "$(view_stat "$V/sparse.img")" = "$v0" ] || fail "view stat changed after refused writes"
cmp "$V/sparse.img" "$T/sparse-at-T" || fail "sparse view changed after refused writes"
# Nested image paths appear as directories.
[ "$(ls "$V" | tr '\n' ' ')" = "pool sparse.img vm.img " ] || fail "ls of the snapshot: $(ls "$V" | tr '\n' ' ')"
[ "$(ls "$V/pool")" = deep ] && [ "$(ls "$V/pool/deep")" = vm.img ] || fail "nested directories: $(ls -R "$V")"
[ -d "$V/pool/deep" ] || fail "pool/deep is not a directory"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); os.pwrite(fd, os.urandom(100000), 4321)' "$MNT/pool/deep/vm.img"
cmp "$V/pool/deep/vm.img" "$T/deep-at-s3" || fail "nested view differs from its image at T"

log "tar, qemu-img and cp read views while the guest writes"
"$PY" - "$MNT/sparse.img" "$MNT/vm.img" "$T/guest.stop" <<'PY' &
import os, random, sys, time
fds = [os.open(p, os.O_RDWR) for p in sys.argv[1:3]]
rng = random.Random(5)
while not os.path.exists(sys.argv[3]):
    fd = rng.choice(fds)
    n = rng.randint(1, 70000)
    off = rng.randrange(0, os.fstat(fd).st_size - n)
    assert os.pwrite(fd, rng.randbytes(n), off) == n
    time.sleep(0.001)
PY
GUEST=$!
BG_PIDS+=("$GUEST")
tar -C "$V" -cSf "$T/v.tar" sparse.img vm.img 2>"$T/tar.err" || fail "tar exited $?: $(cat "$T/tar.err")"
[ ! -s "$T/tar.err" ] || fail "tar warned: $(cat "$T/tar.err")"
qemu-img convert -f raw -O raw "$V/sparse.img" "$T/conv.raw" || fail "qemu-img convert of the view failed"
qemu-img convert -f raw -O raw "$V/vm.img" "$T/conv-vm.raw" || fail "qemu-img convert of the vm view failed"
cp --sparse=always "$V/sparse.img" "$T/cp.raw" || fail "cp of the view failed"
cp --sparse=always "$V/vm.img" "$T/cp-vm.raw" || fail "cp of the vm view failed"
touch "$T/guest.stop"
wait "$GUEST" || fail "the guest writer failed"
mkdir "$T/x"
tar -C "$T/x" -xSf "$T/v.tar" || fail "extracting the tar failed"
cmp "$T/x/sparse.img" "$T/sparse-at-T" || fail "tar: sparse.img differs from the image at T"
cmp "$T/x/vm.img" "$T/vm-at-s3" || fail "tar: vm.img differs from the image at T"
at_alloc=$(allocated "$T/sparse-at-T")
for f in "$T/x/sparse.img" "$T/conv.raw" "$T/cp.raw"; do
	a=$(allocated "$f")
	[ "$a" -le $((at_alloc + 65536)) ] || fail "$f allocates $a bytes, the image at T $at_alloc: holes were lost"
done
# qemu-img rounds a raw image up to 512 bytes: compare with its copy of T.
qemu-img convert -f raw -O raw "$T/sparse-at-T" "$T/conv-at-T.raw"
cmp "$T/conv.raw" "$T/conv-at-T.raw" || fail "qemu-img convert of the view differs from the image at T"
cmp "$T/conv-vm.raw" "$T/vm-at-s3" || fail "qemu-img convert of the vm view differs from the image at T"
cmp "$T/cp.raw" "$T/sparse-at-T" || fail "cp of the view differs from the image at T"
cmp "$T/cp-vm.raw" "$T/vm-at-s3" || fail "cp of the vm view differs from the image at T"
if command -v restic >/dev/null; then
	export RESTIC_PASSWORD=fleecefs-test
	restic -q -r "$T/restic" init >/dev/null || fail "restic init"
	(cd "$V" && restic -q -r "$T/restic" backup sparse.img vm.img) || fail "restic backup of the views"
	restic -q -r "$T/restic" restore latest --target "$T/rr" >/dev/null || fail "restic restore"
	r=$(find "$T/rr" -name sparse.img | head -1)
	cmp "$r" "$T/sparse-at-T" || fail "restic: sparse.img differs"
	cmp "$(dirname "$r")/vm.img" "$T/vm-at-s3" || fail "restic: vm.img differs"
else
	log "restic not installed: that part skipped"
fi
rm -rf "$T/x" "$T/v.tar" "$T"/conv*.raw "$T"/cp*.raw
out=$(ctl "release s3") || fail "release s3: $out"

log "a view is an IMAGE for backup; release waits for the backups reading it"
out=$(ctl "backup $SNAPS/s1/vm.img $OUT/v.raw id=vfull
backup $SNAPS/s1/vm.img $OUT/v-top.raw id=vtop sync=top") || fail "backup of a view refused: $out"
[ "$(wait_job vfull)" = completed ] || fail "vfull: $(status vfull error)"
[ "$(wait_job vtop)" = completed ] || fail "vtop: $(status vtop error)"
cmp "$OUT/v.raw" "$T/at-T" || fail "sync=full backup of the view differs from T"
cmp "$OUT/v-top.raw" "$T/at-T" || fail "sync=top backup of the view differs from T"
python3 "$TESTS_DIR/manifest_check.py" "$OUT/v.raw" || fail "manifest of the view backup"
[ "$(status vfull image)" = "$SNAPS/s1/vm.img" ] || fail "status image=$(status vfull image)"
out=$(ctl "backup $SNAPS/s1/vm.img $OUT/v2.raw id=vslow speed=2M") || fail "refused: $out"
msg=$(ctl_expect EBUSY "release s1")
log "release while a backup reads the view: $msg"
soft eval 'case $msg in *vslow*) ;; *) fail "EBUSY answer does not name the backup vslow: $msg";; esac'
[ -e "$MNT/$SNAPS/s1/vm.img" ] || fail "refused release removed the view"
[ "$(status s1 state)" = running ] || fail "refused release changed s1: $(status s1 state)"
out=$(ctl "set vslow speed=0") || fail "set speed: $out"
[ "$(wait_job vslow)" = completed ] || fail "vslow: $(status vslow error)"
cmp "$OUT/v2.raw" "$T/at-T" || fail "backup of the view that outlived a release attempt differs"
[ -d "$(store_dir s1)" ] || fail "the store of s1 is not at $(store_dir s1)"
out=$(ctl "release s1") || fail "release after the backup: $out"
[ "$out" = ok ] || fail "release answer '$out'"
listed=" $(ls "$MNT/$SNAPS" | tr '\n' ' ')"
case $listed in *" s1 "*) fail "the views of s1 are still listed:$listed";; esac
[ ! -e "$MNT/$SNAPS/s1" ] || fail "the views of s1 are still there"
listed=" $(ls "$MNT/.fleece/jobs" | tr '\n' ' ')"
case $listed in *" s1 "*) fail "the job s1 is still listed:$listed";; esac
[ ! -e "$(store_dir s1)" ] || fail "the store of s1 is still there: $(ls -la "$(store_dir s1)")"
expect ENOENT 'os.stat(A[0])' "$MNT/$SNAPS/s1/vm.img"

log "a store that reaches max-store ends the snapshot, never the guest"
events_start "$T/events.log"
out=$(ctl "snapshot s4 vm.img max-store=1M") || fail "snapshot s4: $out"
cp "$SRC/vm.img" "$T/shadow4"
"$PY" - "$MNT/vm.img" "$T/shadow4" <<'PY' || fail "a guest write failed while the store overflowed"
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR); sh = open(sys.argv[2], "r+b")
rng = random.Random(4)
written = 0
while written < (8 << 20):   # 8 MiB, scattered: far more clusters than 1M holds
    n = rng.randint(1, 65536); off = rng.randrange(0, (32 << 20) - n); data = rng.randbytes(n)
    assert os.pwrite(fd, data, off) == n
    sh.seek(off); sh.write(data)
    written += n
PY
[ "$(wait_job s4 10)" = failed ] || fail "s4 did not fail: $(status s4 state)"
case $(status s4 error) in *max-store*) ;; *) fail "s4 error does not mention max-store: $(status s4 error)";; esac
until_true 10 grep -q ' id=s4 type=snapshot event=failed error=.*max-store' "$T/events.log" ||
	fail "no failed event for s4: $(cat "$T/events.log")"
events_stop "$T/events.log"
cmp "$SRC/vm.img" "$T/shadow4" || fail "the image differs from what the guest wrote"
expect EACCES 'open(A[0], "rb").read(4096)' "$MNT/$SNAPS/s4/vm.img"
[ -z "$(find "$(store_dir s4)" -type f 2>/dev/null)" ] || fail "the failed snapshot kept its store: $(ls -la "$(store_dir s4)")"
out=$(ctl "release s4") || fail "release of a failed snapshot: $out"
[ ! -e "$MNT/$SNAPS/s4" ] && [ ! -e "$MNT/.fleece/jobs/s4" ] || fail "release s4 left its views or job"

log "max-store counts each copied cluster once, however many writers copy at once"
out=$(ctl "snapshot s8 vm.img max-store=17M") || fail "snapshot s8: $out"
"$PY" - "$MNT/vm.img" <<'PY' || fail "concurrent guest writes failed"
import os, random, sys, threading
def write(w):
    fd = os.open(sys.argv[1], os.O_RDWR); rng = random.Random(w)
    for _ in range(400):   # only the first 16 MiB: the store can never hold more
        n = rng.randint(1, 100000); off = rng.randrange(0, (16 << 20) - n)
        assert os.pwrite(fd, rng.randbytes(n), off) == n
threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
for t in threads: t.start()
for t in threads: t.join()
PY
soft eval '[ "$(status s8 state)" = running ] && [ "$(status s8 store_bytes)" -le $((16 << 20)) ] ||
	fail "s8 (max-store=17M, writes only in the first 16 MiB): state=$(status s8 state) error=$(status s8 error) store_bytes=$(status s8 store_bytes) cbw_bytes=$(status s8 cbw_bytes)"'
out=$(ctl "release s8") || fail "release s8: $out"

log "injection: target-write leaves snapshot stores alone, store-write ends the snapshot"
out=$(ctl "snapshot s7 vm.img") || fail "snapshot s7: $out"
inject "target-write from=1 errno=EIO"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); [os.pwrite(fd, os.urandom(4096), o) for o in range(0, 4<<20, 1<<20)]' "$MNT/vm.img"
sleep 0.3
soft eval '[ "$(status s7 state)" = running ] ||
	fail "a target-write rule broke snapshot s7: $(status s7 state): $(status s7 error); rules: $(inject_rules | tr "\n" " ")"'
inject clear
# A store write that fails ends the snapshot, never the guest write.
inject "store-write errno=EIO"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); [os.pwrite(fd, os.urandom(4096), o) for o in range(8<<20, 12<<20, 1<<20)]' "$MNT/vm.img" ||
	fail "a guest write failed with the store failing"
[ "$(wait_job s7 10)" = failed ] || fail "s7 with a failing store: $(status s7 state)"
case $(status s7 error) in *"Input/output error"*) ;; *) fail "s7 error: $(status s7 error)";; esac
inject clear
expect EACCES 'open(A[0], "rb").read(4096)' "$MNT/$SNAPS/s7/vm.img"
[ -z "$(find "$(store_dir s7)" -type f 2>/dev/null)" ] || fail "the failed snapshot s7 kept its store"
out=$(ctl "release s7") || fail "release s7: $out"

log "errors"
ctl_expect ENOENT "snapshot s9 nosuch.img" >/dev/null
[ ! -e "$MNT/.fleece/jobs/s9" ] && [ ! -e "$MNT/$SNAPS/s9" ] && [ ! -e "$(store_dir s9)" ] || fail "a failed snapshot left something"
ctl_expect ENOENT "snapshot s9 vm.img nosuch.img" >/dev/null
[ ! -e "$MNT/.fleece/jobs/s9" ] && [ ! -e "$(store_dir s9)" ] || fail "a half-failed snapshot left something"
out=$(ctl "snapshot s5 vm.img") || fail "snapshot s5: $out"
ctl_expect EEXIST "snapshot s5 a.img" >/dev/null
ctl_expect EEXIST "backup a.img $OUT/x.raw id=s5" >/dev/null
[ ! -e "$OUT/x.raw" ] || fail "a refused backup created its target"
ctl_expect EEXIST "snapshot vfull a.img" >/dev/null
ctl_expect EINVAL "release vfull" >/dev/null
ctl_expect ENOENT "release nosuch" >/dev/null
ctl_expect ENOENT "backup $SNAPS/nosuch/vm.img $OUT/y.raw" >/dev/null
ctl_expect ENOENT "backup $SNAPS/s5/a.img $OUT/y.raw" >/dev/null
ctl_expect EINVAL "backup $SNAPS/s5/vm.img $OUT/y.raw fleecing=on" >/dev/null
[ ! -e "$OUT/y.raw" ] || fail "a refused backup of a view created its target"
[ "$(status s5 state)" = running ] || fail "s5 after refused commands: $(status s5 state)"

log "the stores are removed on unmount"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); [os.pwrite(fd, os.urandom(4096), o) for o in range(0, 32<<20, 1<<20)]' "$MNT/vm.img"
[ "$(du -s --block-size=1 "$(store_dir s5)" | cut -f1)" -gt $((16 * 65536)) ] || fail "the store of s5 holds nothing"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
[ ! -e "$(store_dir s5)" ] || fail "the store of s5 survived the unmount: $(ls -la "$(store_dir s5)")"

log "4K clusters: view reads racing unaligned guest writes return the data of T"
mount_fleece -o cluster_size=4K
race s1 4096 "4K clusters"

log "stores left by a killed daemon are removed at the next start"
out=$(ctl "backup vm.img $OUT/fl.raw id=fl fleecing=on speed=1M") || fail "fleecing backup: $out"
"$PY" -c 'import os,sys; fd=os.open(sys.argv[1],os.O_RDWR); [os.pwrite(fd, os.urandom(4096), o) for o in range(16<<20, 32<<20, 1<<20)]' "$MNT/vm.img"
[ "$(du -s --block-size=1 "$(store_dir s1)" | cut -f1)" -gt 0 ] || fail "the store of s1 holds nothing"
[ -n "$(find "$SRC/.fleecefs/fleecing" -type f -size +0)" ] || fail "no fleecing store with data"
kill_daemon
[ -e "$(store_dir s1)" ] || fail "the store vanished with the killed daemon: nothing left to clean"
mount_fleece
[ ! -e "$(store_dir s1)" ] || fail "a stale snapshot store was not removed at start: $(ls -la "$(store_dir s1)")"
[ -z "$(find "$SRC/.fleecefs/fleecing" -type f 2>/dev/null)" ] || fail "a stale fleecing store was not removed at start"
[ -z "$(ls "$MNT/$SNAPS")" ] || fail "views listed after a restart: $(ls "$MNT/$SNAPS")"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"

log "a store whose file system fills up ends the snapshot, never the guest"
mkdir "$T/small"
mount -t tmpfs -o size=2M tmpfs "$T/small"
EXTRA_MOUNTS+=("$T/small")
STATE=$T/small/state
mount_fleece -o state_dir="$STATE"
events_start "$T/events.log"
out=$(ctl "snapshot s6 vm.img") || fail "snapshot s6: $out"
cp "$SRC/vm.img" "$T/shadow6"
"$PY" - "$MNT/vm.img" "$T/shadow6" <<'PY' || fail "a guest write failed while the store filled its file system"
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR); sh = open(sys.argv[2], "r+b")
rng = random.Random(6)
written = 0
while written < (8 << 20):
    n = rng.randint(1, 65536); off = rng.randrange(0, (32 << 20) - n); data = rng.randbytes(n)
    assert os.pwrite(fd, data, off) == n
    sh.seek(off); sh.write(data)
    written += n
PY
[ "$(wait_job s6 10)" = failed ] || fail "s6 did not fail: $(status s6 state)"
case $(status s6 error) in *"No space left"*) ;; *) fail "s6 error: $(status s6 error)";; esac
until_true 10 grep -q ' id=s6 type=snapshot event=failed error=.*No space left' "$T/events.log" ||
	fail "no failed event for s6: $(cat "$T/events.log")"
events_stop "$T/events.log"
cmp "$SRC/vm.img" "$T/shadow6" || fail "the image differs from what the guest wrote"
expect EACCES 'open(A[0], "rb").read(4096)' "$MNT/$SNAPS/s6/vm.img"
[ -z "$(find "$STATE/snapshots" -type f 2>/dev/null)" ] || fail "the failed snapshot kept its store"
used=$(df --output=used -B1 "$T/small" | tail -1)
[ "$used" -lt $((256 << 10)) ] || fail "the state file system still holds $used bytes"
out=$(ctl "release s6") || fail "release s6: $out"
[ ! -e "$MNT/$SNAPS/s6" ] && [ ! -e "$MNT/.fleece/jobs/s6" ] || fail "release s6 left its views or job"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit $DAEMON_RC"
end_test
