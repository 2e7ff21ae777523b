#!/usr/bin/env bash
# mirror: copy a running image to a new file, keep it in sync (ready), and
# switch the mount over to it on complete; cancel before ready removes the
# copy, cancel after ready keeps a copy of the image at the cancel; error
# policies; the image is busy meanwhile; every bad input refused with
# nothing left; the switch survives a remount and a missing target is EIO,
# never the stale old file.
. "$TESTS_DIR/lib.sh"

random_image "$SRC/vm.img" 32M
random_image "$SRC/other.img" 8M
mount_fleece


# A writer that writes random 4 KiB blocks through the mount until told to
# pause (it stops between two writes and says so) or to stop.
writer_start() {  # IMAGE TAG
	rm -f "$T/$2".{pause,paused,stop}
	"$PY" - "$MNT/$1" "$T/$2" <<'PY' &
import os, random, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
tag = sys.argv[2]
size = os.fstat(fd).st_size
while not os.path.exists(tag + ".stop"):
    if os.path.exists(tag + ".pause"):
        open(tag + ".paused", "w").close()
        while os.path.exists(tag + ".pause") and not os.path.exists(tag + ".stop"):
            time.sleep(0.01)
        os.unlink(tag + ".paused")
        continue
    off = random.randrange(size // 4096) * 4096
    os.pwrite(fd, os.urandom(4096), off)
PY
	BG_PIDS+=("$!")
	eval "WRITER_$2=$!"
}
writer_pause() {
	touch "$T/$1.pause"
	for _ in $(seq 200); do [ -e "$T/$1.paused" ] && return 0; sleep 0.01; done
	fail "writer $1 did not pause"
}
writer_go() { rm -f "$T/$1.pause"; }
writer_stop() {
	local var="WRITER_$1"
	touch "$T/$1.stop"
	wait "${!var}" || fail "writer $1 failed"
}

log "bad input: each refused, nothing created"
touch "$OUT/exists.img"
refused EEXIST "already exists" "mirror vm.img $OUT/exists.img id=bad"
ln "$SRC/vm.img" "$OUT/link.img"
refused EINVAL "is vm.img itself" "mirror vm.img $OUT/link.img id=bad"
refused EINVAL "is vm.img itself" "mirror vm.img $SRC/vm.img id=bad"
rm "$OUT/link.img"
refused EINVAL "inside the mount" "mirror vm.img $MNT/x.img id=bad"
refused EINVAL "SOURCE_DIR" "mirror vm.img $SRC/copy.img id=bad"
[ ! -e "$SRC/copy.img" ] || fail "a refused mirror created a file in SOURCE_DIR"
refused EINVAL "power of two" "mirror vm.img $OUT/m.img granularity=3000 id=bad"
refused EINVAL "from 4K" "mirror vm.img $OUT/m.img granularity=2K id=bad"
refused EINVAL "sync=full or sync=top" "mirror vm.img $OUT/m.img sync=incremental id=bad"
refused EINVAL "copy-mode" "mirror vm.img $OUT/m.img copy-mode=sometimes id=bad"
refused ENOENT "no such image" "mirror nothere.img $OUT/m.img id=bad"
refused ENOENT "directory" "mirror vm.img $OUT/nodir/m.img id=bad"
refused EINVAL "read-only" "mirror .fleece/snapshots/s/vm.img $OUT/m.img id=bad"

log "a slow mirror: complete before ready, a second mirror, busy image, cancel before ready"
start slow "mirror vm.img $OUT/slow.img speed=1M id=slow"
sleep 0.3
want_eq "slow state" "$(status slow state)" running
want_eq "slow in_sync" "$(status slow in_sync)" no
refused EBUSY "running" "complete slow"
refused EBUSY "slow runs on it already" "mirror vm.img $OUT/second.img id=bad"
expect EBUSY 'os.unlink(A[0])' "$MNT/vm.img"
expect EBUSY 'os.truncate(A[0], 4096)' "$MNT/vm.img"
expect EBUSY 'os.rename(A[0], A[1])' "$MNT/other.img" "$MNT/vm.img"
expect EFBIG 'fd = os.open(A[0], os.O_WRONLY); os.pwrite(fd, b"x", 32 << 20)' "$MNT/vm.img"
[ "$(stat -c %s "$SRC/vm.img")" = $((32 << 20)) ] || fail "a write past the end grew the image during a mirror"
[ -n "$(hidden_files "$OUT")" ] || fail "the running mirror has no hidden target file"
ctl "cancel slow" >/dev/null || fail "cancel refused"
want_eq "slow cancelled" "$(wait_job slow)" cancelled
[ ! -e "$OUT/slow.img" ] || fail "cancel before ready left the target"
want_eq "hidden files after cancel" "$(hidden_files "$OUT")" ""
expect OK 'os.truncate(A[0], 32 << 20)' "$MNT/vm.img"

log "background: ready under writes, complete switches every handle, buffered and O_DIRECT"
events_start "$T/ev1"
start m1 "mirror vm.img $OUT/m1.img id=m1"
wait_state m1 ready 30
grep -q "id=m1 type=mirror event=ready" "$T/ev1" || fail "no ready event: $(cat "$T/ev1")"
# Handles opened before the switch, one buffered and one O_DIRECT.
"$PY" - "$MNT/vm.img" "$T/handles" <<'PY' &
import mmap, os, sys, time
buffered = os.open(sys.argv[1], os.O_RDWR)
direct = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 65536)
open(sys.argv[2] + ".open", "w").close()
while not os.path.exists(sys.argv[2] + ".go"):
    time.sleep(0.01)
os.pwrite(buffered, b"after switch, buffered".ljust(4096, b"."), 0)
buf.write(b"after switch, direct".ljust(65536, b"."))
assert os.pwrite(direct, buf, 1 << 20) == 65536
open(sys.argv[2] + ".done", "w").close()
PY
HANDLES=$!
BG_PIDS+=("$HANDLES")
for _ in $(seq 100); do [ -e "$T/handles.open" ] && break; sleep 0.05; done
pwrites vm.img 4096:4096 $((5 << 20)):100000 $((31 << 20)):65536
sleep 0.2
ctl "complete m1" >/dev/null || fail "complete refused"
want_eq "m1" "$(wait_job m1)" completed
grep -q "id=m1 type=mirror event=completed" "$T/ev1" || sleep 0.2
events_stop "$T/ev1"
grep -q "id=m1 type=mirror event=completed" "$T/ev1" || fail "no completed event"
want_eq "m1 switched" "$(status m1 switched)" yes
[ -e "$OUT/m1.img" ] || fail "TARGET is not under its name"
want_eq "hidden files after complete" "$(hidden_files "$OUT")" ""
old_sum=$(sha "$SRC/vm.img")
same "target = image at the switch" "$OUT/m1.img" "$SRC/vm.img"
touch "$T/handles.go"
wait "$HANDLES" || fail "writes through handles opened before the switch failed"
pwrites vm.img $((7 << 20)):8192
want_eq "old file after the switch" "$(sha "$SRC/vm.img")" "$old_sum"
same "the mount serves TARGET" "$MNT/vm.img" "$OUT/m1.img"
at() { "$PY" -c 'import sys; f = open(sys.argv[1], "rb"); f.seek(int(sys.argv[2])); print(f.read(int(sys.argv[3])).decode(errors="replace"))' "$@"; }
want_eq "a buffered handle's write, in TARGET" "$(at "$OUT/m1.img" 0 22)" "after switch, buffered"
want_eq "an O_DIRECT handle's write, in TARGET" "$(at "$OUT/m1.img" $((1 << 20)) 20)" "after switch, direct"
want_match "redirects" "$(cat "$MNT/.fleece/redirects")" "^image=vm.img target=$OUT/m1.img state=ok$"
want_eq "size through the mount" "$(stat -c %s "$MNT/vm.img")" $((32 << 20))
# No longer busy: the image may change size again, and it is TARGET that does.
expect OK 'os.truncate(A[0], 33 << 20)' "$MNT/vm.img"
want_eq "TARGET grew" "$(stat -c %s "$OUT/m1.img")" $((33 << 20))
want_eq "old file kept its size" "$(stat -c %s "$SRC/vm.img")" $((32 << 20))
expect OK 'os.truncate(A[0], 32 << 20)' "$MNT/vm.img"

log "remount: still served from TARGET; a missing TARGET is EIO, never the old file"
unmount_fleece
mount_fleece
same "after remount" "$MNT/vm.img" "$OUT/m1.img"
pwrites vm.img 0:4096
same "a write after remount lands in TARGET" "$MNT/vm.img" "$OUT/m1.img"
want_eq "old file after remount" "$(sha "$SRC/vm.img")" "$old_sum"
unmount_fleece
mv "$OUT/m1.img" "$OUT/m1.away"
mount_fleece
expect EIO 'os.open(A[0], os.O_RDONLY)' "$MNT/vm.img"
want_match "missing redirect" "$(cat "$MNT/.fleece/redirects")" "state=missing"
grep -q "answers EIO" "$T/daemon.log" || fail "the missing target was not logged"
unmount_fleece
mv "$OUT/m1.away" "$OUT/m1.img"
mount_fleece
same "target back" "$MNT/vm.img" "$OUT/m1.img"

log "a mirror of a switched image, cancelled in sync: a copy at the cancel, the mount stays"
writer_start vm.img w1
start m2 "mirror vm.img $OUT/m2.img id=m2 copy-mode=write-blocking"
wait_state m2 ready 30
sleep 0.3
writer_pause w1
cp "$MNT/vm.img" "$T/at-cancel"
ctl "cancel m2" >/dev/null || fail "cancel refused"
want_eq "m2 cancelled in sync" "$(wait_job m2)" completed
writer_go w1
same "copy at the cancel" "$OUT/m2.img" "$T/at-cancel"
want_eq "m2 switched" "$(status m2 switched)" no
sleep 0.3
writer_stop w1
same "the mount stays on the image (TARGET of m1)" "$MNT/vm.img" "$OUT/m1.img"
cmp -s "$OUT/m2.img" "$MNT/vm.img" && fail "the cancelled mirror's copy followed writes after the cancel"

log "complete while a backup or a snapshot uses the image: EBUSY naming it"
start m3 "mirror other.img $OUT/m3.img id=m3"
wait_state m3 ready 30
start b1 "backup other.img $OUT/b1.raw speed=1M id=b1"
refused EBUSY "backup b1" "complete m3"
ctl "cancel b1" >/dev/null
wait_job b1 >/dev/null
start s1 "snapshot s1 other.img"
refused EBUSY "snapshot s1" "complete m3"
ctl "release s1" >/dev/null
# Pause in ready returns to ready; complete is refused while paused; set works.
ctl "pause m3" >/dev/null || fail "pause of a ready mirror refused"
want_eq "m3 paused" "$(status m3 state)" paused
refused EBUSY "paused" "complete m3"
ctl "set m3 speed=64M" >/dev/null || fail "set on a mirror refused"
want_eq "m3 speed" "$(status m3 speed)" $((64 << 20))
ctl "resume m3" >/dev/null || fail "resume refused"
wait_state m3 ready 10
# While it completes (its last copy slowed down), nothing new may start on
# the image.
inject "target-write delay=1500 once"
pwrites other.img 0:65536
sleep 0.2
ctl "complete m3" >/dev/null || fail "complete m3 refused with nothing else running"
sleep 0.2
refused EBUSY "m3 is completing" "backup other.img $OUT/late.raw id=bad"
inject "clear"
want_eq "m3" "$(wait_job m3)" completed
same "other.img switched" "$MNT/other.img" "$OUT/m3.img"

log "write-blocking converges under a writer that never pauses; background at the same rate lags"
random_image "$SRC/busy.img" 32M
writer_start busy.img w2
start lag "mirror busy.img $OUT/lag.img speed=8M id=lag"
sleep 6
want_eq "background under constant writes" "$(status lag state)" running
lag_dirty=$(status lag dirty_bytes)
[ "$lag_dirty" -gt 0 ] || fail "background mirror claims nothing dirty under constant writes"
ctl "cancel lag" >/dev/null
want_eq "lag cancelled" "$(wait_job lag)" cancelled
start wb "mirror busy.img $OUT/wb.img speed=8M copy-mode=write-blocking id=wb"
wait_state wb ready 30
want_eq "write-blocking in sync" "$(status wb in_sync)" yes
sleep 1
[ "$(status wb dirty_bytes)" = 0 ] || fail "write-blocking fell out of sync: $(status wb dirty_bytes) dirty"
[ "$(status wb cbw_bytes)" -gt 0 ] || fail "write-blocking wrote nothing through"
ctl "complete wb" >/dev/null || fail "complete wb refused"
want_eq "wb" "$(wait_job wb)" completed
writer_pause w2
same "busy.img switched under writes" "$MNT/busy.img" "$OUT/wb.img"
writer_stop w2
log "background lagged by $lag_dirty bytes; write-blocking stayed in sync"

log "error policies"
random_image "$SRC/e.img" 16M
inject "target-write offset=8M-9M once"
start er "mirror e.img $OUT/er.img id=er"
want_eq "target error, report" "$(wait_job er)" failed
want_match "er error" "$(status er error)" "writing the target at offset 83886[0-9]+"
[ ! -e "$OUT/er.img" ] && [ -z "$(hidden_files "$OUT")" ] || fail "a failed mirror left its target"
inject "clear
source-read offset=4M-5M once"
start es "mirror e.img $OUT/es.img id=es"
want_eq "source error, report" "$(wait_job es)" failed
want_match "es error" "$(status es error)" "reading the image at offset"
inject "clear
source-read offset=4M-5M once"
start esi "mirror e.img $OUT/esi.img on-source-error=ignore id=esi"
wait_state esi ready 30
ctl "cancel esi" >/dev/null
want_eq "source error, ignore: retried, cancelled in sync" "$(wait_job esi)" completed
same "esi copy" "$OUT/esi.img" "$MNT/e.img"
inject "clear
source-read offset=4M-5M once"
start ess "mirror e.img $OUT/ess.img on-source-error=stop id=ess"
wait_state ess paused 30
want_match "ess error" "$(status ess error)" "reading the image.*on-source-error=stop"
ctl "resume ess" >/dev/null
wait_state ess ready 30
ctl "cancel ess" >/dev/null
want_eq "ess" "$(wait_job ess)" completed
same "ess copy" "$OUT/ess.img" "$MNT/e.img"
inject "clear
target-write offset=8M-9M every=1"
start ei "mirror e.img $OUT/ei.img on-target-error=ignore id=ei"
sleep 1
want_eq "ignore keeps it running" "$(status ei state)" running
[ "$(status ei dirty_bytes)" -gt 0 ] || fail "the failing cluster is not left dirty"
inject "clear"
wait_state ei ready 30
ctl "complete ei" >/dev/null
want_eq "ei" "$(wait_job ei)" completed
same "e.img after an ignored error" "$MNT/e.img" "$OUT/ei.img"
inject "target-write offset=2M-3M once"
start est "mirror e.img $OUT/est.img on-target-error=stop id=est"
wait_state est paused 30
want_match "est error" "$(status est error)" "on-target-error=stop"
ctl "resume est" >/dev/null
wait_state est ready 30
pwrites e.img 0:4096
ctl "cancel est" >/dev/null
want_eq "est cancelled in sync" "$(wait_job est)" completed
same "est copy" "$OUT/est.img" "$MNT/e.img"
# A write-blocking guest write whose target write fails: the guest write
# succeeds, the cluster stays dirty and is copied again.
start ewb "mirror e.img $OUT/ewb.img copy-mode=write-blocking on-target-error=ignore id=ewb"
wait_state ewb ready 30
inject "target-write offset=12M-13M once"
pwrites e.img $((12 << 20)):4096
inject "clear"
[ "$(status ewb guest_target_errors)" = 1 ] || fail "the failed write-through was not counted"
ctl "complete ewb" >/dev/null
want_eq "ewb" "$(wait_job ewb)" completed
same "e.img after a failed write-through" "$MNT/e.img" "$OUT/ewb.img"

log "sync=top copies the data extents only, and counts them; sync=full counts the whole image"
expect OK 'fd = os.open(A[0], os.O_CREAT | os.O_WRONLY, 0o644); os.ftruncate(fd, 64 << 20)' "$MNT/sparse.img"
pwrites sparse.img 0:$((1 << 20)) $((40 << 20)):$((1 << 20))
start top1 "mirror sparse.img $OUT/top1.img sync=top id=top1"
wait_state top1 ready 30
want_eq "sync=top bytes_done" "$(status top1 bytes_done)" $((2 << 20))
want_eq "sync=top bytes_total" "$(status top1 bytes_total)" $((2 << 20))
want_eq "sync=top status" "$(status top1 sync)" top
ctl "cancel top1" >/dev/null
want_eq "top1 cancelled in sync" "$(wait_job top1)" completed
same "sync=top copy" "$OUT/top1.img" "$MNT/sparse.img"
[ "$(du -k "$OUT/top1.img" | cut -f1)" -lt 4096 ] || fail "sync=top filled the holes: $(du -k "$OUT/top1.img")"
start full1 "mirror sparse.img $OUT/full1.img id=full1"
wait_state full1 ready 30
want_eq "sync=full bytes_total" "$(status full1 bytes_total)" $((64 << 20))
want_eq "sync=full bytes_done" "$(status full1 bytes_done)" $((64 << 20))
ctl "cancel full1" >/dev/null
want_eq "full1 cancelled in sync" "$(wait_job full1)" completed
same "sync=full copy" "$OUT/full1.img" "$MNT/sparse.img"

log "unmount with a mirror running: cancel (in sync: a kept copy; before ready: removed)"
random_image "$SRC/u.img" 8M
start u1 "mirror u.img $OUT/u1.img id=u1"
wait_state u1 ready 30
start u2 "mirror vm.img $OUT/u2.img speed=1M id=u2"
unmount_fleece
same "u1 kept at unmount" "$OUT/u1.img" "$SRC/u.img"
[ ! -e "$OUT/u2.img" ] && [ -z "$(hidden_files "$OUT")" ] || fail "a mirror not ready left its target at unmount"
mount_fleece
cmp -s "$MNT/u.img" "$SRC/u.img" || fail "u.img is not served from its own file after a cancelled mirror"
[ "$(grep -c '^image=' "$MNT/.fleece/redirects")" = 4 ] || fail "redirects: $(cat "$MNT/.fleece/redirects")"

log "killed mid-mirror: the next mount removes the hidden target"
start k1 "mirror u.img $OUT/k1.img speed=1M id=k1"
sleep 0.3
[ -n "$(hidden_files "$OUT")" ] || fail "no hidden file while k1 runs"
kill_daemon
mount_fleece
want_eq "hidden files after a crash" "$(hidden_files "$OUT")" ""
[ ! -e "$OUT/k1.img" ] || fail "a killed mirror left TARGET"
cmp -s "$MNT/u.img" "$SRC/u.img" || fail "u.img changed by a killed mirror"

log "unlinking a switched image drops its record, TARGET stays"
rm "$MNT/other.img"
grep -q "image=other.img" "$MNT/.fleece/redirects" && fail "the record of a removed image stayed"
[ -e "$OUT/m3.img" ] || fail "removing the image removed TARGET"
unmount_fleece
mount_fleece
[ ! -e "$MNT/other.img" ] || fail "other.img came back"

log "SIGTERM with one mirror in sync and one not ready: the copy in sync kept, the other removed"
start t1 "mirror u.img $OUT/t1.img id=t1"
wait_state t1 ready 30
start t2 "mirror vm.img $OUT/t2.img speed=1M id=t2"
sleep 0.3
want_eq "t2 not ready yet" "$(status t2 in_sync)" no
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || true
DAEMON_PID=
same "t1 kept at SIGTERM" "$OUT/t1.img" "$SRC/u.img"
[ ! -e "$OUT/t2.img" ] || fail "SIGTERM before ready left the target"
[ -z "$(hidden_files "$OUT")" ] || fail "SIGTERM left hidden files"

log "a damaged switch record: the mount is refused, saying where, never the old files served"
cp "$SRC/.fleecefs/redirects" "$T/redirects.good"
printf 'garbage without an equals sign\n' >> "$SRC/.fleecefs/redirects"
rc=0
"$FLEECEFS" -f "$SRC" "$MNT" 2>"$T/bad-start.log" || rc=$?
[ "$rc" != 0 ] || fail "fleecefs started with a damaged redirects file"
grep -q "redirects: line .*: not key=value" "$T/bad-start.log" || fail "no message naming the damage: $(cat "$T/bad-start.log")"
[ "$(wc -l < "$T/bad-start.log")" -le 2 ] || fail "more than a line or two: $(cat "$T/bad-start.log")"
grep -q " $MNT fuse" /proc/mounts && fail "a refused start left a mount"
cp "$T/redirects.good" "$SRC/.fleecefs/redirects"
mount_fleece
same "served again once repaired" "$MNT/vm.img" "$OUT/m1.img"
end_test
