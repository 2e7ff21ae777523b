#!/usr/bin/env bash
# FUSE over io_uring (-o uring=): the rings really carry the guest's requests
# (the daemon's own count at stop), every byte fio writes reads back through
# them (O_DIRECT aligned, O_DIRECT unaligned, buffered), a backup started while
# fio writes over the rings is the image at T, writes under a dirty bitmap
# stay on the fast path and are all in the bitmap, so do writes to clusters a
# snapshot saved already (and its view stays T), uring=off leaves the rings
# alone, bad values are refused, and SIGTERM under load stops the daemon
# with every write that reached the image in its dirty bitmap.
# Needs the fuse module's enable_uring (tests/run-all.sh turns it on).
. "$TESTS_DIR/lib.sh"
command -v fio >/dev/null || { echo "SKIP: fio not installed"; exit 77; }
param=/sys/module/fuse/parameters/enable_uring
[ -e "$param" ] || { echo "SKIP: this kernel has no FUSE over io_uring ($param)"; exit 77; }
grep -q '^[Y1]' "$param" || fail "$param is off: tests/run-all.sh turns it on (echo Y > $param)"

served_line() { grep 'FUSE over io_uring: [0-9]* requests served' "$T/daemon.log" | tail -n 1; }
# ring_counts: the daemon's count at its last stop into $served and $fast.
ring_counts() {
	read -r served fast < <(served_line | sed -n 's/.*: \([0-9]*\) requests served, \([0-9]*\) of them.*/\1 \2/p') || true
	served=${served:-0} fast=${fast:-0}
}
# seq_writes NAME QD: 2048 writes of 4 KiB over the first 8 MiB, O_DIRECT.
seq_writes() {
	fio --name="$1" --filename="$MNT/vm.img" --rw=write --bs=4k --size=8M --direct=1 --ioengine=libaio \
	    --iodepth="$2" --output="$T/fio-$1.out" >/dev/null 2>&1 || fail "fio $1: $(tail -3 "$T/fio-$1.out")"
}

random_image "$SRC/vm.img" 64M

log "bad values are refused before anything is mounted"
rc=0; err=$("$FLEECEFS" -f -o uring=maybe "$SRC" "$MNT" 2>&1) || rc=$?
[ "$rc" = 1 ] || fail "uring=maybe: exit status $rc, want 1"
want_match "uring=maybe" "$err" "uring=maybe: must be on, off or auto"
mountpoint -q "$MNT" && fail "uring=maybe left a mount"

log "uring=on: the rings come up and carry fio's verified writes"
mount_fleece -o uring=on
grep -q 'FUSE over io_uring: [0-9]* queues' "$T/daemon.log" || fail "no ring started: $(tail -3 "$T/daemon.log")"
for spec in "direct4k randwrite 4k-4k 1" "unaligned randwrite 512-9k 1" "buffered randwrite 4k-64k 0" "big write 1m-1m 1"; do
	set -- $spec
	fio --name="$1" --filename="$MNT/vm.img" --rw="$2" --bsrange="$3" --size=64M --direct="$4" \
	    --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 \
	    --verify_state_save=0 --randrepeat=0 --output="$T/fio-$1.out" >/dev/null 2>&1 ||
		fail "fio $1 failed: $(grep -iE 'verify|error' "$T/fio-$1.out" | head -5)"
done
# What the mount shows is the file on disk, byte for byte.
cmp "$MNT/vm.img" "$SRC/vm.img" || fail "the mount and the source file differ"

log "a backup started under fio over the rings is the image at T"
cp "$SRC/vm.img" "$T/at-T"
out=$(ctl "backup vm.img $OUT/pit.raw id=pit speed=16M") || fail "backup refused: $out"
fio --name=during --filename="$MNT/vm.img" --rw=randwrite --bs=4k --size=64M --direct=1 \
    --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --verify_state_save=0 --randrepeat=0 --output="$T/fio-during.out" >/dev/null 2>&1 ||
	fail "fio during the backup failed: $(grep -iE 'verify|error' "$T/fio-during.out" | head -5)"
[ "$(wait_job pit)" = completed ] || fail "backup: $(status pit error)"
[ "$(status pit cbw_bytes)" -gt 0 ] || fail "no copy-before-write happened: the test did not overlap"
cmp "$T/at-T" "$OUT/pit.raw" || fail "the backup is not the image at T"
unmount_fleece
[ "$DAEMON_RC" = 0 ] || fail "daemon exit status $DAEMON_RC"
line=$(served_line)
[ -n "$line" ] || fail "no count of ring requests at stop"
ring_counts
# fio's aligned phases alone are over 30000 reads and writes of the image.
[ "$served" -gt 30000 ] || fail "only $served requests came over the rings: $line"
[ "$fast" -gt 20000 ] || fail "only $fast requests took the fast path: $line"
[ "$fast" -lt "$served" ] || fail "every request took the fast path, even those a job or the namespace needs: $line"

log "with a dirty bitmap, writes keep the fast path and every one is in the bitmap"
: >"$T/daemon.log"
mount_fleece -o uring=on
ctl "bitmap add vm.img b1" >/dev/null || fail "bitmap add"
want_eq "a new bitmap" "$(dirty vm.img b1)" 0
# The first 8 MiB, then one write at each further 8 MiB.
seq_writes bitmap 16
for i in 1 2 3 4 5 6 7; do
	dd if=/dev/urandom of="$MNT/vm.img" bs=4k count=1 seek=$((i * 2048)) oflag=direct conv=notrunc status=none
done
want_eq "dirty bytes" "$(dirty vm.img b1)" $(((8 << 20) + 7 * 65536))
unmount_fleece
ring_counts
# Only a region's first write waits for its intent record (the slow way).
[ "$fast" -gt 1900 ] || fail "with a bitmap only $fast of $served requests took the fast path"

log "under a snapshot, writes to clusters it saved already keep the fast path; the view stays T"
: >"$T/daemon.log"
mount_fleece -o uring=on
cp "$SRC/vm.img" "$T/at-T"
out=$(ctl "snapshot s1 vm.img") || fail "snapshot refused: $out"
# 16 writes of 4 KiB to each of 128 clusters, one at a time: the first of
# each copies (at a deeper queue, the others would wait for that copy).
seq_writes snapshot 1
cmp "$T/at-T" "$MNT/.fleece/snapshots/s1/vm.img" || fail "the snapshot view is not the image at T"
cmp -s "$T/at-T" "$MNT/vm.img" && fail "fio changed nothing"
unmount_fleece
ring_counts
[ "$fast" -gt 1700 ] || fail "under a snapshot only $fast of $served requests took the fast path"

log "uring=off: no ring"
: >"$T/daemon.log"
mount_fleece -o uring=off
dd if="$MNT/vm.img" of=/dev/null bs=1M count=8 status=none
unmount_fleece
grep -q 'io_uring' "$T/daemon.log" && fail "uring=off used io_uring: $(grep io_uring "$T/daemon.log")"

log "SIGTERM while fio writes over the rings: the daemon stops, the mount goes, and every"
log "   write that reached the image is in the next incremental (none lands after the bitmaps' save)"
: >"$T/daemon.log"
mount_fleece -o uring=on
run_ok base "bitmap add vm.img inc
backup vm.img $OUT/chain.raw bitmap=inc id=base"
fio --name=load --filename="$MNT/vm.img" --rw=randrw --bs=4k --size=64M --direct=1 --ioengine=libaio \
    --iodepth=16 --time_based --runtime=30 --output="$T/fio-load.out" >/dev/null 2>&1 &
BG_PIDS+=($!)
sleep 2
term_daemon
[ "$DAEMON_RC" = 0 ] || fail "daemon exit status $DAEMON_RC after SIGTERM"
grep -q " $MNT fuse" /proc/mounts && fail "the mount is still there after SIGTERM"
[ -n "$(served_line)" ] || fail "no count of ring requests at stop: the rings did not stop cleanly"
kill "${BG_PIDS[-1]}" 2>/dev/null || true
wait "${BG_PIDS[-1]}" 2>/dev/null || true
mount_fleece -o uring=on
run_ok inc "backup vm.img $OUT/chain.raw sync=incremental bitmap=inc id=inc"
cmp "$SRC/vm.img" "$OUT/chain.raw" || fail "the incremental after SIGTERM misses writes that reached the image"
unmount_fleece
log "PASS"
