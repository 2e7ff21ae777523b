#!/usr/bin/env bash
# bitmap-mode=always with qcow2 targets (SPEC section 5): a qcow2 full or
# incremental that fails keeps what reached it as TARGET.partial, itself a
# valid qcow2 file (qemu-img check clean; the clusters it lacks read as
# before the job: zeroes, or the backing file) with a partial manifest; the
# next incremental completes it in place and renames it to TARGET, exact at
# its own point in time. Completing it may fail again (it stays a valid
# partial) or be killed (the next mount puts it back as it was).
. "$TESTS_DIR/lib.sh"

command -v qemu-img >/dev/null || fail "qemu-img is needed (apt-get install qemu-utils)"
M=$((1024 * 1024))
# content FILE OUT: what QEMU reads from a qcow2 file (its chain included).
content() { qemu-img convert -f qcow2 -O raw "$1" "$2" || fail "qemu-img convert $1"; }
# exact FILE REF: a complete qcow2 backup equal to REF, with its manifest.
exact() {
	qcow2_clean "$1"
	qemu-img compare -q -f raw -F qcow2 "$2" "$1" || fail "$(basename "$1") differs from its point in time"
	manifest_ok "$1" "$(basename "$1")"
}
# partial FILE: a kept partial: valid qcow2, partial manifest, no final name.
partial() {
	qcow2_clean "$1"
	manifest_ok "$1" "$(basename "$1")" partial
}
# mixed WHAT P NEW OLD FAILED [MIN]: every 64K cluster of P holds NEW's or
# OLD's content (what arrived, what was there before the job), the cluster at
# byte FAILED holds OLD's, and at least MIN (default 1) clusters that differ
# hold NEW's.
mixed() {
	"$PY" - "$2" "$3" "$4" "$5" "${6:-1}" <<'PY' || fail "$1"
import sys
p, new, old = (open(f, "rb").read() for f in sys.argv[1:4])
failed, least, cs = int(sys.argv[4]), int(sys.argv[5]), 65536
assert len(p) == len(new) == len(old), (len(p), len(new), len(old))
arrived = 0
for c in range(0, len(p), cs):
    a, n, o = p[c:c + cs], new[c:c + cs], old[c:c + cs]
    assert a in (n, o), f"cluster at {c} is neither"
    arrived += a == n != o
assert p[failed:failed + cs] == old[failed:failed + cs], "the failed cluster holds new data"
assert arrived >= least, "nothing arrived"
print(f"{arrived} changed clusters arrived")
PY
}

random_image "$SRC/vm.img" 16M
# One copy worker (threads/16): runs reach the write-behind queue in offset
# order, so what lands before an injected failure is known. With two, the
# failing run may be queued first and everything behind it is discarded.
MOUNT_OPTS="-o threads=15"
mount_fleece $MOUNT_OPTS
ctl "bitmap add vm.img p" >/dev/null || fail "bitmap add"

log "a qcow2 full backup that fails keeps a valid partial"
inject "target-write offset=8M-9M from=1 errno=EIO"
start f "backup vm.img $OUT/full.qcow2 bitmap=p bitmap-mode=always id=f"
[ "$(wait_job f)" = failed ] || fail "f: $(status f state)"
inject clear
want_eq "f partial" "$(status f partial)" "$OUT/full.qcow2.partial"
[ ! -e "$OUT/full.qcow2" ] || fail "the failed full backup has TARGET's name"
partial "$OUT/full.qcow2.partial"
# What it holds: the image's clusters that arrived, zeroes for the rest.
content "$OUT/full.qcow2.partial" "$T/p0"
truncate -s 16M "$T/zeroes"
mixed "the full partial is not the image's clusters or zeroes" "$T/p0" "$SRC/vm.img" "$T/zeroes" $((8 * M))
[ "$(bmkey vm.img p last_backup_partial)" = yes ] || fail "chain record: $(cat "$MNT/.fleece/bitmaps/vm.img/p")"

log "the next incremental completes it in place and renames it"
pwrites vm.img $((3 * M + 100)):5000 $((12 * M)):70000
cp "$SRC/vm.img" "$T/ref1"
run_ok c1 "backup vm.img $OUT/full.qcow2 sync=incremental bitmap=p bitmap-mode=always id=c1"
exact "$OUT/full.qcow2" "$T/ref1"
[ ! -e "$OUT/full.qcow2.partial" ] && [ ! -e "$OUT/full.qcow2.partial.xxh3" ] || fail "the partial outlived its completion"
[ -z "$(hidden_files "$OUT")" ] || fail "hidden files left: $(hidden_files "$OUT")"
want_eq "completed full has no backing" "$(qinfo "$OUT/full.qcow2" ".get('backing-filename', '')")" ""

log "a qcow2 incremental that fails keeps a partial over its backing file"
pwrites vm.img $((1 * M)):4096 $((9 * M)):300000 $((14 * M + 5)):10
cp "$SRC/vm.img" "$T/ref2"
cp "$OUT/full.qcow2" "$T/full-before"
# The failing write takes its time: the other dirty clusters arrive first.
inject "target-write offset=9M-10M from=1 errno=EIO delay=300"
start i "backup vm.img $OUT/inc.qcow2 sync=incremental bitmap=p bitmap-mode=always id=i"
[ "$(wait_job i)" = failed ] || fail "i: $(status i state)"
inject clear
partial "$OUT/inc.qcow2.partial"
want_eq "the partial's backing" "$(qinfo "$OUT/inc.qcow2.partial" ".get('backing-filename', '')")" full.qcow2
content "$OUT/inc.qcow2.partial" "$T/p1"
# Clusters that did not arrive read as the backing file (the earlier point).
mixed "the incremental's partial" "$T/p1" "$T/ref2" "$T/ref1" $((9 * M))
same "the backing file under a failed incremental" "$T/full-before" "$OUT/full.qcow2"

log "completing it fails again: it stays a valid partial"
pwrites vm.img $((2 * M)):65536
cp "$SRC/vm.img" "$T/ref3"
inject "target-write offset=9M-10M from=1 errno=EIO delay=300"
start i2 "backup vm.img $OUT/inc.qcow2 sync=incremental bitmap=p bitmap-mode=always id=i2"
[ "$(wait_job i2)" = failed ] || fail "i2: $(status i2 state)"
inject clear
partial "$OUT/inc.qcow2.partial"
content "$OUT/inc.qcow2.partial" "$T/p2"
# (The writes queued behind the failing one may or may not have landed.)
mixed "the partial after a second failure" "$T/p2" "$T/ref3" "$T/p1" $((9 * M)) 0

log "a daemon killed while completing it: the next mount puts the partial back"
pwrites vm.img $((5 * M)):65536
cp "$OUT/inc.qcow2.partial.xxh3" "$T/partial-manifest"
inject "target-write from=1 delay=3000"
start k "backup vm.img $OUT/inc.qcow2 sync=incremental bitmap=p bitmap-mode=always id=k"
sleep 0.5
want_eq "k while it writes" "$(status k state)" running
kill_daemon
mount_fleece $MOUNT_OPTS
[ ! -e "$OUT/inc.qcow2" ] || fail "the killed completion has TARGET's name"
[ -z "$(hidden_files "$OUT")" ] || fail "the next mount left hidden files: $(hidden_files "$OUT")"
partial "$OUT/inc.qcow2.partial"
content "$OUT/inc.qcow2.partial" "$T/p3"
same "the partial after a killed completion" "$T/p2" "$T/p3"
same "its manifest" "$T/partial-manifest" "$OUT/inc.qcow2.partial.xxh3"

refused EINVAL "completes with the backing file it has: no backing=" \
	"backup vm.img $OUT/inc.qcow2 sync=incremental bitmap=p backing=$OUT/full.qcow2 id=bad"

log "the next incremental completes it, exact"
cp "$SRC/vm.img" "$T/ref4"
run_ok c2 "backup vm.img $OUT/inc.qcow2 sync=incremental bitmap=p id=c2"
exact "$OUT/inc.qcow2" "$T/ref4"
want_eq "the completed incremental's backing" "$(qinfo "$OUT/inc.qcow2" ".get('backing-filename', '')")" full.qcow2
exact "$OUT/full.qcow2" "$T/ref1"
[ ! -e "$OUT/inc.qcow2.partial" ] || fail "the partial outlived its completion"

unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exited with $DAEMON_RC"
log "ok"
