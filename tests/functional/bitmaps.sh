#!/usr/bin/env bash
# Dirty bitmaps and incremental chains (SPEC sections 3 and 5), as a user of
# QEMU's dirty bitmaps would expect them:
#   1. chain start: `bitmap add` + full backup with bitmap= in one write while
#      a guest writes: the writes after T are in the bitmap and in the first
#      incremental, which makes the full target equal to the image;
#   2. option validation: each bad request refused with its errno and a one-
#      line message, nothing started, no file created or changed;
#   3. busy: remove/clear/merge into a bitmap and a second backup with it fail
#      with EBUSY naming the job while it runs, and work after it concluded;
#   4. an incremental copies exactly the dirty clusters (bytes_total/done),
#      updates the chain's raw full backup in place and its manifest;
#   5. bitmap-mode=always cancelled with a slow target: the partial keeps
#      only what reached the target; the bits and the next incremental;
#   6. persistence across remounts and renames through the mount;
#   7. an image changed while unmounted, or a deleted identity record:
#      state=inconsistent, incremental refused, a new full chain repairs it;
#   7b. listings of more than 64 images and bitmaps, each name once;
#   8. deleting an image through the mount removes its bitmaps at unmount;
#   9. SIGKILL of the daemon under writes (3 moments, one during an
#      incremental): after restart an incremental is still exact.
# Sizes are small so that the whole file runs in about 30 s.
. "$TESTS_DIR/lib.sh"

CS=65536           # the default cluster size and bitmap granularity
M=$((1 << 20))

# ---- helpers ------------------------------------------------------------------

# covered SIZE OFF:LEN...: bytes of the clusters these writes touch.
covered() {
	"$PY" - "$CS" "$@" <<'PY'
import sys
cs, size = int(sys.argv[1]), int(sys.argv[2])
cl = set()
for a in sys.argv[3:]:
    off, n = (int(x) for x in a.split(":"))
    cl.update(range(off // cs, (off + n - 1) // cs + 1))
print(sum(min(cs, size - c * cs) for c in cl))
PY
}
# at CLUSTER... : OFF:LEN words, a 4 KiB write 100 bytes into each cluster.
at() { local c; for c in "$@"; do printf '%s:4096 ' $((c * CS + 100)); done; }
jobs_now() { ls "$MNT/.fleece/jobs" | sort | tr '\n' ' '; }
# state_dir_of IMAGE: the bitmaps directory of an image (by its inode).
state_dir_of() { echo "$SRC/.fleecefs/bitmaps/$(stat -c '%d-%i' "$SRC/$1")"; }

# =============================================================================
log "1. chain start: bitmap add + full backup in one write, while a guest writes"
random_image "$SRC/chain.img" 16M
mount_fleece
cp "$SRC/chain.img" "$T/chain-at-T"
# The writer starts after T (the go file) and writes until the full concluded;
# it logs every write as OFF:LEN.
"$PY" - "$MNT/chain.img" "$T/go" "$MNT/.fleece/jobs/full1/status" "$T/w1.log" <<'PY' > "$T/w1.count" &
import os, random, sys, time
path, go, status, log = sys.argv[1:5]
rng = random.Random(11)
while not os.path.exists(go):
    time.sleep(0.005)
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size
n = 0
with open(log, "w") as L:
    while "state=running" in open(status).read():
        off, ln = rng.randrange(0, size - 20000), rng.randint(1, 20000)
        assert os.pwrite(fd, os.urandom(ln), off) == ln
        L.write(f"{off}:{ln}\n")
        L.flush()
        n += 1
        time.sleep(0.03)
print(n)
PY
writer=$!
BG_PIDS+=("$writer")
start full1 "bitmap add chain.img b1
backup chain.img $OUT/chain.raw bitmap=b1 speed=8M id=full1"
touch "$T/go"
wait "$writer" || fail "the writer failed"
[ "$(cat "$T/w1.count")" -ge 20 ] || fail "only $(cat "$T/w1.count") writes while the full ran"
want_eq "full1 state" "$(wait_job full1)" completed
soft same "the full backup (image at T)" "$T/chain-at-T" "$OUT/chain.raw"
soft manifest_ok "$OUT/chain.raw"
cov=$(covered $((16 * M)) $(cat "$T/w1.log"))
log "   $(cat "$T/w1.count") writes during the full, $((cov / CS)) clusters"
soft want_eq "dirty_bytes after the full = the clusters written during it" "$(dirty chain.img b1)" "$cov"
soft want_eq "bitmap state" "$(bmkey chain.img b1 state)" active
soft want_eq "last_backup_target" "$(bmkey chain.img b1 last_backup_target)" "$OUT/chain.raw"
cp "$SRC/chain.img" "$T/chain-at-T2"
run_ok inc1 "backup chain.img $OUT/chain.raw sync=incremental bitmap=b1 id=inc1"
soft want_eq "first incremental's bytes_total" "$(status inc1 bytes_total)" "$cov"
soft same "the full after the first incremental" "$T/chain-at-T2" "$OUT/chain.raw"
soft manifest_ok "$OUT/chain.raw"
soft want_eq "dirty_bytes after the incremental" "$(dirty chain.img b1)" 0
soft want_eq "last_backup_sync" "$(bmkey chain.img b1 last_backup_sync)" incremental

# =============================================================================
log "2. option validation"
random_image "$SRC/v.img" 4M
run_ok vfull "bitmap add v.img vb
backup v.img $OUT/v.raw bitmap=vb id=vfull"
ctl "bitmap add v.img nofull" >/dev/null || fail "bitmap add nofull"
ctl "snapshot vs v.img" >/dev/null || fail "snapshot vs"
cp "$OUT/v.raw" "$OUT/other.raw"
sums_before=$(cd "$OUT" && md5sum v.raw v.raw.xxh3 other.raw)
jobs_before=$(jobs_now)
bitmaps_before=$(ls "$MNT/.fleece/bitmaps/v.img" | tr '\n' ' ')
# refuse ERRNO REGEX COMMAND [FILE...]: refused with ERRNO and a one-line
# message matching REGEX; no job started; no FILE (nor FILE.xxh3) created.
refuse() {
	local want=$1 re=$2 cmd=$3 out f
	shift 3
	out=$(ctl_expect "$want" "$cmd") || exit 1
	want_match "'$cmd': message" "$out" "$re"
	want_eq "'$cmd': jobs" "$(jobs_now)" "$jobs_before"
	for f in "$@"; do [ ! -e "$f" ] && [ ! -e "$f.xxh3" ] || fail "'$cmd' created $f"; done
}
soft refuse EINVAL "incremental.*bitmap=" "backup v.img $OUT/n1.raw sync=incremental" "$OUT/n1.raw"
soft refuse ENOENT "bitmap nope" "backup v.img $OUT/n2.raw bitmap=nope" "$OUT/n2.raw"
soft refuse ENOENT "bitmap nope" "backup v.img $OUT/v.raw sync=incremental bitmap=nope"
soft refuse EINVAL "bitmap-mode.*bitmap" "backup v.img $OUT/n3.raw bitmap-mode=always" "$OUT/n3.raw"
soft refuse EINVAL "sync=none.*bitmap" "backup v.img $OUT/n4.raw sync=none bitmap=vb" "$OUT/n4.raw"
soft refuse EINVAL "power of two" "bitmap add v.img g1 granularity=96K"
soft refuse EINVAL "below the cluster size" "bitmap add v.img g2 granularity=4K"
soft refuse EEXIST "vb" "bitmap add v.img vb"
for op in remove clear enable disable; do
	soft refuse ENOENT "no bitmap nope" "bitmap $op v.img nope"
done
soft refuse ENOENT "no bitmap nope" "bitmap merge v.img nope vb"
soft refuse ENOENT "no bitmap nope" "bitmap merge v.img vb nope"
ctl "bitmap add v.img g128 granularity=128K" >/dev/null || fail "bitmap add granularity=128K"
soft refuse EINVAL "granularity" "bitmap merge v.img vb g128"
ctl "bitmap remove v.img g128" >/dev/null || fail "bitmap remove g128"
soft refuse EINVAL "last backup $OUT/v.raw" "backup v.img $OUT/other.raw sync=incremental bitmap=vb"
soft refuse EINVAL "last backup $OUT/v.raw" "backup v.img $OUT/n5.raw sync=incremental bitmap=vb" "$OUT/n5.raw"
soft refuse EINVAL "no full backup" "backup v.img $OUT/v.raw sync=incremental bitmap=nofull"
soft refuse EINVAL "snapshot view" "bitmap add .fleece/snapshots/vs/v.img x"
soft refuse EINVAL "snapshot view" "backup .fleece/snapshots/vs/v.img $OUT/n6.raw bitmap=vb" "$OUT/n6.raw"
# All or nothing: a refused line undoes the bitmap added by an earlier one.
soft refuse ENOENT "bitmap nope" "bitmap add v.img new1
backup v.img $OUT/n7.raw bitmap=nope" "$OUT/n7.raw"
soft refuse EINVAL "no full backup" "bitmap add v.img new2
backup v.img $OUT/v.raw sync=incremental bitmap=new2"
soft want_eq "bitmaps of v.img after the refusals" "$(ls "$MNT/.fleece/bitmaps/v.img" | tr '\n' ' ')" "$bitmaps_before"
soft want_eq "targets after the refusals" "$(cd "$OUT" && md5sum v.raw v.raw.xxh3 other.raw)" "$sums_before"
soft want_eq "vb after the refusals" "$(dirty v.img vb) $(bmkey v.img vb busy)" "0 "
ctl "release vs" >/dev/null || fail "release vs"

# =============================================================================
log "3. a bitmap used by a running backup is busy"
random_image "$SRC/busy.img" 16M
ctl "bitmap add busy.img b1
bitmap add busy.img b2" >/dev/null || fail "bitmap add busy.img"
pwrites busy.img $(at 1 2 3)    # b1 has bits, so clear and merge would change it
start bjob7 "backup busy.img $OUT/busy.raw bitmap=b1 speed=1M id=bjob7"
soft want_eq "busy= while the job runs" "$(bmkey busy.img b1 busy)" bjob7
jobs_before=$(jobs_now)
for cmd in "bitmap remove busy.img b1" "bitmap clear busy.img b1" "bitmap merge busy.img b1 b2"; do
	soft refuse EBUSY "bjob7" "$cmd"
done
soft refuse EBUSY "bjob7" "backup busy.img $OUT/busy2.raw bitmap=b1 id=second" "$OUT/busy2.raw"
want_eq "bjob7 still running after the refusals" "$(status bjob7 state)" running
soft want_eq "b1 still listed" "$(ls "$MNT/.fleece/bitmaps/busy.img" | tr '\n' ' ')" "b1 b2 "
ctl "cancel bjob7" >/dev/null || fail "cancel bjob7"
want_eq "bjob7" "$(wait_job bjob7)" cancelled
soft want_eq "busy= after the job" "$(bmkey busy.img b1 busy)" ""
soft want_eq "b1 after the cancel: its bits at T are back" "$(dirty busy.img b1)" $((3 * CS))
out=$(ctl "bitmap merge busy.img b1 b2") || fail "merge after the job: $out"
out=$(ctl "bitmap clear busy.img b1") || fail "clear after the job: $out"
soft want_eq "b1 after clear" "$(dirty busy.img b1)" 0
run_ok second "backup busy.img $OUT/busy2.raw bitmap=b1 id=second"
bdir=$(state_dir_of busy.img)
out=$(ctl "bitmap remove busy.img b1") || fail "remove after the job: $out"
soft want_eq "bitmaps of busy.img after remove" "$(ls "$MNT/.fleece/bitmaps/busy.img" | tr '\n' ' ')" "b2 "
soft want_eq "state files of b1 after remove" "$(cd "$bdir" && ls b1.* 2>/dev/null)" ""

# =============================================================================
log "4. an incremental copies exactly the dirty clusters"
random_image "$SRC/ex.img" 32M
run_ok exfull "bitmap add ex.img b1
backup ex.img $OUT/ex.raw bitmap=b1 id=exfull"
soft want_eq "dirty after an idle full" "$(dirty ex.img b1)" 0
# 4 KiB writes inside clusters 3 (twice), 10 (its last 4 KiB), 100; writes
# straddling 19|20, 199|200, 300|301; one byte in 450 and in the last, 511.
spans="$((3 * CS)):4096 $((3 * CS + 8192)):4096 $((10 * CS + 61440)):4096 $((100 * CS + 1)):4096
$((20 * CS - 2048)):4096 $((200 * CS - 1)):2 $((300 * CS + 60000)):70000 $((450 * CS + 65535)):1
$((512 * CS - 1)):1"
pwrites ex.img $spans
want=$(covered $((32 * M)) $spans)
[ "$want" = $((11 * CS)) ] || fail "test bug: $want"
soft want_eq "dirty_bytes of 11 clusters" "$(dirty ex.img b1)" "$want"
run_ok exinc "backup ex.img $OUT/ex.raw sync=incremental bitmap=b1 id=exinc"
soft want_eq "incremental bytes_total" "$(status exinc bytes_total)" "$want"
soft want_eq "incremental bytes_done" "$(status exinc bytes_done)" "$want"
soft same "the updated full" "$SRC/ex.img" "$OUT/ex.raw"
soft manifest_ok "$OUT/ex.raw"
soft want_eq "dirty after the incremental" "$(dirty ex.img b1)" 0
# An odd size: the last cluster is 12345 bytes long.
head -c $((8 * M + 12345)) /dev/urandom > "$SRC/odd.img"
run_ok oddfull "bitmap add odd.img b1
backup odd.img $OUT/odd.raw bitmap=b1 id=oddfull"
pwrites odd.img 0:1 $((8 * M + 12344)):1
run_ok oddinc "backup odd.img $OUT/odd.raw sync=incremental bitmap=b1 id=oddinc"
soft want_eq "odd-size incremental bytes_total" "$(status oddinc bytes_total)" $((CS + 12345))
soft same "the updated odd-size full" "$SRC/odd.img" "$OUT/odd.raw"
soft manifest_ok "$OUT/odd.raw"

# =============================================================================
log "5. bitmap-mode=always, cancelled while its target is slow"
# (The whole mode x sync x outcome matrix is tests/functional/chain-outcomes.sh.)
# Every target write takes 100 ms: most of what the job read is still queued
# at the cancel. The partial backup keeps only what reached the target, the
# rest is put back as the earlier backup had it, and the bits hold it.
random_image "$SRC/m.img" 32M
MT=$OUT/m.raw
run_ok mfull "bitmap add m.img b1
backup m.img $MT bitmap=b1 id=mfull"
A_CL=$(seq 3 8 379) B_CL="$(seq 400 2 414) 379"
NA=48 NB=9 NAB=56
pwrites m.img $(at $A_CL)
want_eq "bits at T" "$(dirty m.img b1)" $((NA * CS))
cp "$MT" "$T/m-before"
inject "target-write from=1 delay=100"
start mslow "backup m.img $MT sync=incremental bitmap=b1 bitmap-mode=always id=mslow"
pwrites m.img $(at $B_CL)
sleep 0.5
want_eq "mslow: running before the cancel" "$(status mslow state)" running
ctl "cancel mslow" >/dev/null || fail "cancel mslow"
want_eq mslow "$(wait_job mslow)" cancelled
inject clear
soft want_eq "mslow: the partial" "$(status mslow partial)" "$MT.partial"
soft eval '[ ! -e "$MT" ] || fail "the partial is under the name of the backup"'
soft manifest_ok "$MT.partial" "mslow (the partial)" partial
bits=$(dirty m.img b1)
# At 100 ms per target write, at most about 10 of the 48 clusters reached
# the target before the cancel: the rest stays to do.
lo=$(( (NA + NB - 15) * CS )) hi=$((NAB * CS))
log "   mslow: bits $((bits / CS)) clusters"
soft eval '[ "$bits" -ge "$lo" ] && [ "$bits" -lt "$hi" ] ||
	fail "mslow: bits $bits, want clusters not yet in the target + B: at least $lo and less than $hi"'
# Clusters that did not reach the target hold the earlier backup's data.
"$PY" - "$T/m-before" "$MT.partial" "$SRC/m.img" "$CS" $A_CL <<'PY' || soft fail "the partial is not earlier + what landed"
import sys
before, part, now = (open(p, "rb").read() for p in sys.argv[1:4])
cs = int(sys.argv[4])
a = {int(c) for c in sys.argv[5:]}
for c in range(len(before) // cs):
    x = part[c * cs:(c + 1) * cs]
    if c not in a and x != before[c * cs:(c + 1) * cs]:
        sys.exit(f"cluster {c} (not in A) changed in the partial")
PY
run_ok mslow-next "backup m.img $MT sync=incremental bitmap=b1 id=mslow-next"
soft want_eq "mslow: the next incremental copies the bits" "$(status mslow-next bytes_total)" "$bits"
soft same "mslow: the target after the next incremental" "$SRC/m.img" "$MT"
soft manifest_ok "$MT" "mslow (after the next incremental)"
soft want_eq "mslow: bits after the next incremental" "$(dirty m.img b1)" 0

# =============================================================================
log "6. persistence: remount, rename through the mount (also into a subdirectory)"
random_image "$SRC/p.img" 16M
run_ok pfull "bitmap add p.img b1
bitmap add p.img b2 granularity=1M disabled
backup p.img $OUT/p.raw bitmap=b1 id=pfull"
pwrites p.img $(at 5 6 70 71 200)
soft want_eq "p.img b1 before the remount" "$(dirty p.img b1)" $((5 * CS))
unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
mount_fleece
soft want_eq "b1 after a remount" "$(dirty p.img b1) $(bmkey p.img b1 state) $(bmkey p.img b1 recording)" \
	"$((5 * CS)) active yes"
soft want_eq "b2 after a remount" "$(bmkey p.img b2 granularity) $(dirty p.img b2) $(bmkey p.img b2 recording)" \
	"$M 0 no"
run_ok pinc1 "backup p.img $OUT/p.raw sync=incremental bitmap=b1 id=pinc1"
soft want_eq "pinc1 bytes_total" "$(status pinc1 bytes_total)" $((5 * CS))
soft same "p.raw after pinc1" "$SRC/p.img" "$OUT/p.raw"
pwrites p.img $(at 9 100 101)
mv "$MNT/p.img" "$MNT/q.img"
soft eval '[ ! -e "$MNT/.fleece/bitmaps/p.img" ] || fail "p.img still listed after mv p.img q.img"'
soft want_eq "q.img b1" "$(dirty q.img b1) $(bmkey q.img b1 image)" "$((3 * CS)) q.img"
mkdir "$MNT/sub"
mv "$MNT/q.img" "$MNT/sub/r.img"
soft want_eq "sub/r.img b1" "$(dirty sub/r.img b1) $(bmkey sub/r.img b1 image)" "$((3 * CS)) sub/r.img"
soft eval '[ ! -e "$MNT/.fleece/bitmaps/q.img" ] || fail "q.img still listed after the rename"'
unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
mount_fleece
soft want_eq "sub/r.img b1 after a remount" "$(dirty sub/r.img b1) $(bmkey sub/r.img b1 state)" "$((3 * CS)) active"
soft want_eq "sub/r.img b2 after a remount" "$(bmkey sub/r.img b2 name)" b2
run_ok pinc2 "backup sub/r.img $OUT/p.raw sync=incremental bitmap=b1 id=pinc2"
soft want_eq "pinc2 bytes_total" "$(status pinc2 bytes_total)" $((3 * CS))
soft same "p.raw after pinc2" "$SRC/sub/r.img" "$OUT/p.raw"
soft manifest_ok "$OUT/p.raw"

# =============================================================================
log "7. an image changed while unmounted; an identity record deleted"
random_image "$SRC/o.img" 8M
random_image "$SRC/id.img" 8M
out=$(ctl "bitmap add o.img b1
backup o.img $OUT/o.raw bitmap=b1 id=ofull
bitmap add id.img b1
backup id.img $OUT/id.raw bitmap=b1 id=idfull") || fail "ofull/idfull refused: $out"
want_eq "two fulls in one write" "$out" "ok id=ofull id=idfull"
want_eq ofull "$(wait_job ofull)" completed
want_eq idfull "$(wait_job idfull)" completed
iddir=$(state_dir_of id.img)
[ -f "$iddir/image" ] || fail "no identity record $iddir/image"
unmount_fleece
printf 'X' | dd of="$SRC/o.img" bs=1 seek=123457 conv=notrunc status=none
rm "$iddir/image"
mount_fleece
soft want_eq "o.img b1 state" "$(bmkey o.img b1 state)" inconsistent
soft want_match "o.img b1 reason" "$(bmkey o.img b1 reason)" "changed while fleecefs was not running"
osum=$(md5sum < "$OUT/o.raw")
jobs_before=$(jobs_now)
soft refuse EINVAL "inconsistent.*full backup" "backup o.img $OUT/o.raw sync=incremental bitmap=b1"
soft want_eq "o.raw after the refusal" "$(md5sum < "$OUT/o.raw")" "$osum"
soft eval 'ls "$MNT/.fleece/bitmaps" >/dev/null || fail "listing .fleece/bitmaps fails"'
soft want_eq "id.img b1 state" "$(bmkey id.img b1 state 2>&1)" inconsistent
soft want_match "id.img b1 reason" "$(bmkey id.img b1 reason 2>&1)" "identity"
soft refuse EINVAL "inconsistent" "backup id.img $OUT/id.raw sync=incremental bitmap=b1"
# A new full chain makes o.img's bitmap trustworthy again.
run_ok ofull2 "backup o.img $OUT/o2.raw bitmap=b1 id=ofull2"
soft want_eq "o.img b1 after a new full" "$(bmkey o.img b1 state) $(dirty o.img b1)" "active 0"
soft same "o2.raw" "$SRC/o.img" "$OUT/o2.raw"
pwrites o.img $(at 1 2 100)
jobs_before=$(jobs_now)
soft refuse EINVAL "last backup $OUT/o2.raw" "backup o.img $OUT/o.raw sync=incremental bitmap=b1"
run_ok oinc "backup o.img $OUT/o2.raw sync=incremental bitmap=b1 id=oinc"
soft want_eq "oinc bytes_total" "$(status oinc bytes_total)" $((3 * CS))
soft same "o2.raw after oinc" "$SRC/o.img" "$OUT/o2.raw"

# =============================================================================
log "7b. listings with more than 64 entries"
mkdir -p "$SRC/many"
cmds=
for i in $(seq 70); do
	head -c 65536 /dev/urandom > "$SRC/many/i$i.img"
	cmds+="bitmap add many/i$i.img b"$'\n'
done
for i in $(seq 70); do cmds+="bitmap add many/i1.img m$i"$'\n'; done
out=$(ctl "$cmds") || fail "140 bitmap adds refused: $out"
soft want_eq "images listed under many/" "$(ls "$MNT/.fleece/bitmaps/many" | sort -u | wc -l) $(ls "$MNT/.fleece/bitmaps/many" | wc -l)" "70 70"
soft want_eq "bitmaps of many/i1.img" "$(ls "$MNT/.fleece/bitmaps/many/i1.img" | wc -l)" 71

# =============================================================================
log "8. deleting an image through the mount removes its bitmaps at unmount"
random_image "$SRC/d.img" 4M
ctl "bitmap add d.img b1" >/dev/null || fail "bitmap add d.img"
ddir=$(state_dir_of d.img)
[ -d "$ddir" ] || fail "no state directory $ddir"
rm "$MNT/d.img"
unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
soft eval '[ ! -e "$ddir" ] || fail "$ddir is still there: $(ls "$ddir")"'

# =============================================================================
log "9. SIGKILL of the daemon while a guest writes"
# 64 MiB: four write-intent regions of 16 MiB; the writer writes into the
# second and the fourth only.
random_image "$SRC/c.img" 64M
mount_fleece
run_ok cfull "bitmap add c.img b1
backup c.img $OUT/c.raw bitmap=b1 id=cfull"
cat > "$T/cw.py" <<'PY'
import os, random, sys
rng = random.Random(int(sys.argv[2]))
fd = os.open(sys.argv[1], os.O_WRONLY)
n = 0
try:
    while True:
        ln = rng.choice([512, 4096, 65536, rng.randint(1, 300000)])
        off = rng.choice([16, 48]) * 2**20 + rng.randrange(0, 16 * 2**20 - ln)
        os.pwrite(fd, os.urandom(ln), off)
        n += 1
        if n % 20 == 0:
            os.fdatasync(fd)
except OSError:
    pass   # the daemon is gone
PY
# crash ROUND: the writer runs; kill -9 at this round's moment; restart.
crash() {
	local round=$1 w
	"$PY" "$T/cw.py" "$MNT/c.img" "$round" &
	w=$!
	BG_PIDS+=("$w")
	case $round in
	1) sleep 0.3;;
	2) sleep 1.5;;
	3)  # during a rate-limited incremental that copies what the writer wrote
		sleep 0.5
		cp "$OUT/c.raw" "$T/c-prev"
		start crinc "backup c.img $OUT/c.raw sync=incremental bitmap=b1 speed=1M id=crinc"
		for _ in $(seq 200); do [ "$(status crinc bytes_done)" -gt 0 ] && break; sleep 0.02; done
		sleep 0.3
		[ "$(status crinc state)" = running ] || fail "crinc is not running at the kill";;
	esac
	kill_daemon
	wait "$w" || true
	mount_fleece
}
for round in 1 2 3; do
	[ "$round" = 3 ] || cp "$OUT/c.raw" "$T/c-prev"
	crash "$round"
	bits=$(dirty c.img b1)
	log "   round $round: dirty after the restart $((bits / M)) MiB, state $(bmkey c.img b1 state)"
	soft want_eq "round $round: state after the crash" "$(bmkey c.img b1 state)" active
	# Never misses: every cluster where the image differs from the last
	# backup is dirty (counted here, proven by the incremental below).
	diff=$("$PY" - "$SRC/c.img" "$T/c-prev" "$CS" <<'PY'
import sys
cs = int(sys.argv[3])
with open(sys.argv[1], "rb") as a, open(sys.argv[2], "rb") as b:
    n = 0
    while True:
        x, y = a.read(cs), b.read(cs)
        if not x:
            break
        n += x != y
print(n * cs)
PY
)
	[ "$diff" -gt 0 ] || fail "round $round: the writer changed nothing"
	soft eval '[ "$bits" -ge "$diff" ] || fail "round $round: dirty_bytes $bits < $diff bytes of changed clusters"'
	if [ "$(bmkey c.img b1 state)" != active ]; then
		# Keep going with a new chain so that the other rounds still run.
		rm -f "$OUT/c.raw" "$OUT/c.raw.xxh3"
		run_ok "crfull$round" "backup c.img $OUT/c.raw bitmap=b1 id=crfull$round"
		continue
	fi
	# The chain's next incremental, as usual (checksum=xxh3). If that is
	# refused, the bits are still checked with checksum=none.
	cmd="backup c.img $OUT/c.raw sync=incremental bitmap=b1 id=crnext$round" sum=yes
	if ! out=$(ctl "$cmd" 2>/dev/null); then
		soft fail "round $round: the chain's next incremental is refused after the crash: $out"
		start "crnext$round" "$cmd checksum=none"
		sum=no
	fi
	want_eq "crnext$round" "$(wait_job "crnext$round")" completed
	soft want_eq "round $round: the incremental copies the bits" "$(status "crnext$round" bytes_total)" "$bits"
	soft same "round $round: the target after the incremental" "$SRC/c.img" "$OUT/c.raw"
	[ "$sum" = no ] || soft manifest_ok "$OUT/c.raw" "round $round"
done

unmount_fleece
want_eq "daemon exit status" "$DAEMON_RC" 0
end_test
